"""The compiled (cpu, cuda) MLM head (torch [M, H] part + streamed compiled cross-entropy)
vs the fp64 reference (fastmlm/reference/mlm_head.py), forward and every gradient; then
the public op `fastmlm.ops.mlm_head` with its `cpu` / `cuda` backend.

Gradient outputs of the cross-entropy start as NaN (its poison switch), so a row or a
vocabulary chunk no matmul wrote cannot pass. CUDA cases run when a GPU and a _C built
with CUDA exist.
"""
from __future__ import annotations

import pytest
import torch

from fastmlm.kernels.compiled import cross_entropy as ce
from fastmlm.kernels.compiled import mlm_head as kernel
from fastmlm.reference import mlm_head as reference
from tests.tolerances import assert_close

pytestmark = pytest.mark.skipif(kernel.available("cpu") is not None, reason=str(kernel.available("cpu")))

HAS_CUDA_KERNELS = torch.cuda.is_available() and kernel.available("cuda") is None
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not HAS_CUDA_KERNELS, reason="needs a GPU and fastmlm._C built with CUDA"))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IGNORE = -100
EPS = 1e-12
PARAM_NAMES = ("hidden_all", "dense_weight", "dense_bias", "norm_weight", "norm_bias",
               "decoder_weight", "decoder_bias")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(ce, "_POISON_OUTPUTS", True)


def make_inputs(N, M, H, V, dtype, device="cpu", *, seed=0, duplicates=False, decoder_bias=True, ignored=True):
    gen = torch.Generator().manual_seed(seed)
    params = dict(
        hidden_all=torch.randn(N, H, generator=gen),
        dense_weight=torch.randn(H, H, generator=gen) / H ** 0.5,
        dense_bias=0.1 * torch.randn(H, generator=gen),
        norm_weight=1 + 0.1 * torch.randn(H, generator=gen),
        norm_bias=0.1 * torch.randn(H, generator=gen),
        decoder_weight=torch.randn(V, H, generator=gen) / H ** 0.5,
        decoder_bias=torch.randn(V, generator=gen) if decoder_bias else None,
    )
    params = {k: None if v is None else v.to(device, dtype) for k, v in params.items()}
    index = torch.randperm(N, generator=gen)[:M]
    if duplicates and M >= 3:
        index[1:3] = index[0]  # the same row three times: the scatter must add
    targets = torch.randint(0, V, (M,), generator=gen)
    if ignored and M > 1:
        targets[1::3] = IGNORE
    grad = torch.rand(M, generator=gen) + 0.5
    return params, index.to(device), targets.to(device), grad.to(device)


def run_kernel(params, index, targets, grad, *, ls=0.0, zl=0.0, chunk_size=None, deterministic=False):
    opts = dict(ignore_index=IGNORE, label_smoothing=ls, z_loss=zl, chunk_size=chunk_size)
    p = [params[k] for k in PARAM_NAMES]
    outputs = kernel.mlm_head_forward(p[0], index, *p[1:], targets, layer_norm_eps=EPS, **opts)
    grads = kernel.mlm_head_backward(grad, p[0], index, *p[1:], targets, *outputs[2:], outputs[1],
                                     layer_norm_eps=EPS, deterministic=deterministic, **opts)
    return outputs, grads


def check_against_reference(params, index, targets, grad, row_loss, lse, grads, *, ls, zl):
    """row_loss, lse and the 7 gradients of sum(grad * row_loss) against the fp64 reference."""
    dtype = params["hidden_all"].dtype
    M = index.shape[0]
    for name, t in (("row_loss", row_loss), ("lse", lse)):
        assert t.dtype == torch.float32 and t.shape == (M,), name
    leaves = {k: None if v is None else v.double().requires_grad_() for k, v in params.items()}
    ref_loss, ref_lse = reference.mlm_head_forward(
        leaves["hidden_all"], index, *[leaves[k] for k in PARAM_NAMES[1:]], targets, layer_norm_eps=EPS,
        ignore_index=IGNORE, label_smoothing=ls, z_loss=zl)
    if M:
        assert_close(row_loss, ref_loss, dtype, "row_loss")
        assert_close(lse, ref_lse, dtype, "lse")
    if ref_loss.requires_grad and (targets != IGNORE).any():
        (ref_loss * grad.double()).sum().backward()
    for name, g in zip(PARAM_NAMES, grads):
        leaf = leaves[name]
        if leaf is None:
            assert g is None
            continue
        assert g.dtype == dtype and g.shape == leaf.shape and g.device == leaf.device, name
        expected = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        if expected.abs().max() == 0:
            assert torch.equal(g, torch.zeros_like(g)), f"{name} should be zero"
        else:
            assert_close(g, expected, dtype, f"grad of {name}")


def run_and_compare(params, index, targets, grad, *, ls=0.0, zl=0.0, chunk_size=None, deterministic=False):
    dtype = params["hidden_all"].dtype
    outputs, grads = run_kernel(params, index, targets, grad, ls=ls, zl=zl, chunk_size=chunk_size,
                                deterministic=deterministic)
    M, H = index.shape[0], params["hidden_all"].shape[1]
    for name, t in (("pre", outputs[2]), ("act", outputs[3]), ("normed", outputs[4])):
        assert t.dtype == dtype and t.shape == (M, H), name
    for name, t in (("ln_mean", outputs[5]), ("ln_rstd", outputs[6])):
        assert t.dtype == torch.float32 and t.shape == (M,), name
    # The saved tensors are what the reference backend saves (up to rounding), so a backward
    # of any backend can follow this forward.
    saved = reference.mlm_head_forward_saved(
        params["hidden_all"].double(), index, *[None if params[k] is None else params[k].double()
                                                for k in PARAM_NAMES[1:]], targets,
        layer_norm_eps=EPS, ignore_index=IGNORE, label_smoothing=ls, z_loss=zl)
    for name, got, want in zip(("pre", "act", "normed", "ln_mean", "ln_rstd"), outputs[2:], saved[2:]):
        if M:
            assert_close(got, want, dtype, name)
    check_against_reference(params, index, targets, grad, outputs[0], outputs[1], grads, ls=ls, zl=zl)
    return outputs, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 1, 16, 37), (40, 17, 24, 100), (64, 33, 48, 301)])
def test_matches_reference(shape, dtype, device):
    params, index, targets, grad = make_inputs(*shape, dtype, device, duplicates=True)
    run_and_compare(params, index, targets, grad, ls=0.1, zl=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_vocab_not_a_multiple_of_the_chunk(dtype, device):
    params, index, targets, grad = make_inputs(30, 20, 32, 203, dtype, device, seed=1)
    run_and_compare(params, index, targets, grad, chunk_size=64)   # 3 full chunks + 11 columns
    run_and_compare(params, index, targets, grad, chunk_size=1)    # one column per chunk
    run_and_compare(params, index, targets, grad, chunk_size=500)  # one chunk, wider than V


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ls, zl", [(0.0, 0.0), (0.2, 0.0), (0.0, 1e-2), (1.0, 1e-3)])
def test_label_smoothing_and_z_loss(ls, zl, device):
    params, index, targets, grad = make_inputs(25, 12, 32, 90, torch.float32, device, seed=2)
    run_and_compare(params, index, targets, grad, ls=ls, zl=zl)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_no_decoder_bias_int32_index_strided_hidden(dtype, device):
    params, index, targets, grad = make_inputs(40, 17, 24, 100, dtype, device, seed=3, decoder_bias=False)
    N, H = params["hidden_all"].shape
    wide = torch.full((N, 2 * H), float("nan"), device=device, dtype=dtype)
    wide[:, ::2] = params["hidden_all"]
    params["hidden_all"] = wide[:, ::2]  # column stride 2: only the gathered rows are read
    params["dense_weight"] = params["dense_weight"].t().contiguous().t()  # transposed strides
    run_and_compare(params, index.int(), targets, grad)


@pytest.mark.filterwarnings("ignore::UserWarning")  # the reference var()s over 0 rows
@pytest.mark.parametrize("device", DEVICES)
def test_empty_selection_and_all_ignored(device):
    params, index, targets, grad = make_inputs(12, 6, 16, 37, torch.float32, device, seed=4)
    outputs, grads = run_and_compare(params, index[:0], targets[:0], grad[:0])
    assert all(t.shape[0] == 0 for t in outputs)
    assert all(not g.any() for g in grads)
    targets = torch.full_like(targets, IGNORE)
    outputs, grads = run_and_compare(params, index, targets, grad, ls=0.1, zl=1e-3)
    assert not outputs[0].any()
    assert all(not g.any() for g in grads)


@pytest.mark.parametrize("device", DEVICES)
def test_every_row_is_the_same_position(device):
    # All masked rows gather one position: d_hidden_all is zero except that row, which sums them all.
    params, index, targets, grad = make_inputs(9, 7, 16, 40, torch.float32, device, seed=5, ignored=False)
    index = torch.full_like(index, 4)
    _, grads = run_and_compare(params, index, targets, grad)
    others = torch.cat([grads[0][:4], grads[0][5:]])
    assert not others.any() and grads[0][4].abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_backward_is_repeatable(device):
    params, index, targets, grad = make_inputs(50, 40, 32, 120, torch.float32, device, seed=6, duplicates=True)
    index[3:20] = index[0]
    first = run_kernel(params, index, targets, grad, deterministic=True)[1]
    second = run_kernel(params, index, targets, grad, deterministic=True)[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 1, 16, 37), (64, 33, 48, 301), (12, 0, 16, 37)])
def test_forward_backward_matches_reference(shape, dtype, device):
    # Gradients of grad_scale * sum(row_loss), formed at forward time.
    params, index, targets, _ = make_inputs(*shape, dtype, device, seed=9, duplicates=True)
    fused = kernel.mlm_head_forward_backward(
        params["hidden_all"], index, *[params[k] for k in PARAM_NAMES[1:]], targets, layer_norm_eps=EPS,
        ignore_index=IGNORE, label_smoothing=0.1, z_loss=1e-3, grad_scale=0.25)
    assert len(fused) == 9
    weights = torch.full((index.shape[0],), 0.25, device=device)
    check_against_reference(params, index, targets, weights, fused[0], fused[1], fused[2:], ls=0.1, zl=1e-3)


def test_bad_inputs_raise():
    params, index, targets, grad = make_inputs(12, 6, 16, 37, torch.float32)
    args = lambda **over: [over.get(k, params[k]) for k in PARAM_NAMES]  # noqa: E731
    opts = dict(layer_norm_eps=EPS, ignore_index=IGNORE, label_smoothing=0.0, z_loss=0.0)

    def forward(p, index=index, targets=targets):
        return kernel.mlm_head_forward(p[0], index, *p[1:], targets, **opts)

    with pytest.raises(ValueError, match="dense_weight"):
        forward(args(dense_weight=params["dense_weight"][:, :-1]))
    with pytest.raises(TypeError, match="norm_weight"):
        forward(args(norm_weight=params["norm_weight"].half()))
    with pytest.raises(TypeError, match="hidden_all"):
        forward(args(**{k: None if v is None else v.double() for k, v in params.items()}))
    with pytest.raises(ValueError, match="index must be"):
        forward(args(), index=index.float())
    with pytest.raises(ValueError, match="targets must be"):
        forward(args(), targets=targets[:-1])
    with pytest.raises(ValueError, match="targets must be in"):
        forward(args(), targets=torch.full_like(targets, 37))
    with pytest.raises(ValueError, match="decoder"):
        forward(args(decoder_weight=params["decoder_weight"][:, :-1]))
    outputs = forward(args())
    with pytest.raises(ValueError, match="pre must be"):
        kernel.mlm_head_backward(grad, params["hidden_all"], index, *args()[1:], targets, outputs[2][:-1],
                                 *outputs[3:], outputs[1], **opts)


# ------------------------------------------------------------------ the public op

@pytest.mark.parametrize("device", DEVICES)
def test_op_dispatches_here_and_matches_the_torch_backend(device):
    from fastmlm.ops.dispatch import use_backend
    from fastmlm.ops.mlm_head import MLM_HEAD, mlm_head

    params, index, targets, _ = make_inputs(30, 12, 16, 37, torch.float32, device, seed=7, duplicates=True)
    if device == "cpu":  # on CUDA the triton backend comes first
        assert MLM_HEAD.choose("cpu", params["hidden_all"]).name == "cpu"
    results = {}
    for backend in ("torch", device):
        leaves = {k: None if v is None else v.clone().requires_grad_() for k, v in params.items()}
        with use_backend(backend, "mlm_head"):
            loss = mlm_head(leaves["hidden_all"], index, *[leaves[k] for k in PARAM_NAMES[1:]], targets,
                            label_smoothing=0.1, z_loss=1e-3)
            loss.backward()
        results[backend] = (loss, [leaves[k].grad for k in PARAM_NAMES])
    assert_close(results[device][0], results["torch"][0], torch.float32, "loss")
    for name, a, e in zip(PARAM_NAMES, results[device][1], results["torch"][1]):
        assert_close(a, e, torch.float32, f"grad of {name}")


def test_op_passes_opcheck():
    import importlib

    from fastmlm.ops.dispatch import use_backend

    op_module = importlib.import_module("fastmlm.ops.mlm_head")  # fastmlm.ops.mlm_head is also a function name

    params, index, targets, _ = make_inputs(5, 3, 16, 37, torch.float32, seed=8)
    params = {k: None if v is None else v.requires_grad_() for k, v in params.items()}
    args = (params["hidden_all"], index, *[params[k] for k in PARAM_NAMES[1:]], targets, EPS, IGNORE, 0.1, 1e-3)
    with use_backend("cpu", "mlm_head"):
        torch.library.opcheck(op_module._forward_op, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
