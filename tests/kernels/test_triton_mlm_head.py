"""Fused Triton MLM head (gathered dense + GELU, LayerNorm, streamed cross-entropy)
vs the fp64 reference (fastmlm/reference/mlm_head.py), forward and every gradient;
then the public op `fastmlm.ops.mlm_head` with its `triton` backend.

Interpreter (CPU) shapes are tiny; with CUDA the same tests run at larger shapes,
bf16 and bert-base's hidden size and vocabulary.
"""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit functions are defined (before the kernel import below).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastmlm.kernels.triton.mlm_head import mlm_head_backward, mlm_head_forward  # noqa: E402
from fastmlm.reference import mlm_head as reference  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and os.environ.get("TRITON_INTERPRET", "0") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

# bf16 runs in the interpreter too: fastmlm's interpreter shim widens bf16 dot operands.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N rows of hidden_all, M masked rows, H, V)
SHAPES = [(3, 1, 16, 37), (40, 17, 24, 100)] if not CUDA else \
    [(3, 1, 64, 37), (1024, 154, 768, 30522), (4096, 600, 256, 5003)]
# For tests about behaviour rather than numerics.
SMALL = (12, 6, 16, 37) if not CUDA else (4096, 600, 256, 5003)
IGNORE = -100
EPS = 1e-12
PARAM_NAMES = ("hidden_all", "dense_weight", "dense_bias", "norm_weight", "norm_bias",
               "decoder_weight", "decoder_bias")


def make_inputs(N, M, H, V, dtype, *, seed=0, duplicates=False, decoder_bias=True):
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
    params = {k: None if v is None else v.to(DEVICE, dtype) for k, v in params.items()}
    index = torch.randperm(N, generator=gen)[:M].sort().values
    if duplicates and M >= 3:
        index[1:3] = index[0]  # the same row three times: the scatter must add
    targets = torch.randint(0, V, (M,), generator=gen)
    if M > 1:
        targets[1::3] = IGNORE
    grad = torch.rand(M, generator=gen) + 0.5
    return params, index.to(DEVICE), targets.to(DEVICE), grad.to(DEVICE)


def run_and_compare(params, index, targets, grad, *, ls=0.0, zl=0.0, deterministic=False):
    dtype = params["hidden_all"].dtype
    opts = dict(ignore_index=IGNORE, label_smoothing=ls, z_loss=zl)
    row_loss, lse, pre, act, normed, mean, rstd = mlm_head_forward(
        params["hidden_all"], index, params["dense_weight"], params["dense_bias"], params["norm_weight"],
        params["norm_bias"], params["decoder_weight"], params["decoder_bias"], targets, layer_norm_eps=EPS, **opts)
    grads = mlm_head_backward(grad, params["hidden_all"], index, params["dense_weight"], params["norm_weight"],
                              params["decoder_weight"], params["decoder_bias"], targets, pre, act, normed, mean,
                              rstd, lse, deterministic=deterministic, **opts)
    leaves = {k: None if v is None else v.double().requires_grad_() for k, v in params.items()}
    ref_loss, ref_lse = reference.mlm_head_forward(
        leaves["hidden_all"], index, leaves["dense_weight"], leaves["dense_bias"], leaves["norm_weight"],
        leaves["norm_bias"], leaves["decoder_weight"], leaves["decoder_bias"], targets, layer_norm_eps=EPS, **opts)
    # The kernels round the activations to the input dtype; fp32 for fp32, else a
    # half-precision chain: compare at the input dtype's tolerance.
    assert_close(row_loss, ref_loss, dtype, "row_loss")
    assert_close(lse, ref_lse, dtype, "lse")
    if ref_loss.requires_grad and (targets != IGNORE).any():
        (ref_loss * grad.double()).sum().backward()
    for name, g in zip(PARAM_NAMES, grads):
        leaf = leaves[name]
        if leaf is None:
            assert g is None
            continue
        assert g.dtype == dtype and g.shape == leaf.shape, name
        expected = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        if expected.abs().max() == 0:
            assert torch.equal(g, torch.zeros_like(g)), f"{name} should be zero"
        else:
            assert_close(g, expected, dtype, f"grad of {name}")
    return grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_matches_reference(shape, dtype, deterministic):
    params, index, targets, grad = make_inputs(*shape, dtype, duplicates=True)
    run_and_compare(params, index, targets, grad, ls=0.1, zl=1e-3, deterministic=deterministic)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_decoder_bias_int32_index_strided_hidden(dtype):
    params, index, targets, grad = make_inputs(*SHAPES[-1], dtype, seed=1, decoder_bias=False)
    N, H = params["hidden_all"].shape
    wide = torch.full((N, 2 * H), float("nan"), device=DEVICE, dtype=dtype)
    wide[:, ::2] = params["hidden_all"]
    params["hidden_all"] = wide[:, ::2]  # column stride 2: only the gathered rows are read
    run_and_compare(params, index.int(), targets, grad)


@pytest.mark.parametrize("deterministic", [False, True])
def test_all_ignored_and_empty(deterministic):
    params, index, targets, grad = make_inputs(*SMALL, torch.float32, seed=2)
    targets.fill_(IGNORE)
    grads = run_and_compare(params, index, targets, grad, deterministic=deterministic)
    assert all(not g.any() for g in grads)
    run_and_compare(params, index[:0], targets[:0], grad[:0], deterministic=deterministic)


def test_deterministic_scatter_is_repeatable_with_duplicates():
    params, index, targets, grad = make_inputs(*SMALL, torch.float32, seed=3, duplicates=True)
    first = run_and_compare(params, index, targets, grad, deterministic=True)
    second = run_and_compare(params, index, targets, grad, deterministic=True)
    for a, b in zip(first, second):
        assert a is None or torch.equal(a, b)


@pytest.mark.parametrize("deterministic", [False, True])
def test_out_of_range_index_makes_its_row_nan_and_writes_nothing_outside(deterministic):
    # The kernel API takes the index as given (the op checks values, except with value
    # checks off): a row outside [0, N) must read and write nothing and come out NaN,
    # never a plausible loss or a write past d_hidden_all.
    params, index, targets, grad = make_inputs(*SMALL, torch.float32, seed=4)
    N = params["hidden_all"].shape[0]
    targets.fill_(3)
    bad = index.clone()
    bad[1], bad[3] = N, -1
    opts = dict(ignore_index=IGNORE, label_smoothing=0.0, z_loss=0.0)
    p = [params[k] for k in PARAM_NAMES]
    row_loss, lse, pre, act, normed, mean, rstd = mlm_head_forward(p[0], bad, *p[1:], targets,
                                                                   layer_norm_eps=EPS, **opts)
    good = torch.ones_like(row_loss, dtype=torch.bool)
    good[[1, 3]] = False
    assert row_loss[~good].isnan().all() and row_loss[good].isfinite().all()
    expected = mlm_head_forward(p[0], index, *p[1:], targets, layer_norm_eps=EPS, **opts)[0]
    assert torch.equal(row_loss[good], expected[good])
    # Backward: the bad rows' (NaN) input gradients are dropped, not scattered anywhere, so
    # d_hidden_all is what the good rows alone give.
    d_hidden_all = mlm_head_backward(grad, p[0], bad, p[1], p[3], p[5], p[6], targets, pre, act, normed,
                                     mean, rstd, lse, deterministic=deterministic, **opts)[0]
    kept = mlm_head_forward(p[0], index[good], *p[1:], targets[good], layer_norm_eps=EPS, **opts)
    expected = mlm_head_backward(grad[good], p[0], index[good], p[1], p[3], p[5], p[6], targets[good], *kept[2:],
                                 kept[1], deterministic=deterministic, **opts)[0]
    assert d_hidden_all.isfinite().all()
    torch.testing.assert_close(d_hidden_all, expected, rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise():
    params, index, targets, grad = make_inputs(*SMALL, torch.float32)
    args = lambda **over: [over.get(k, params[k]) for k in PARAM_NAMES]  # noqa: E731
    opts = dict(layer_norm_eps=EPS, ignore_index=IGNORE, label_smoothing=0.0, z_loss=0.0)

    def forward(p, index=index, targets=targets):
        return mlm_head_forward(p[0], index, *p[1:], targets, **opts)

    with pytest.raises(ValueError, match="dense_weight"):
        forward(args(dense_weight=params["dense_weight"][:, :-1]))
    with pytest.raises(TypeError, match="norm_weight"):
        forward(args(norm_weight=params["norm_weight"].half()))
    with pytest.raises(ValueError, match="index must be"):
        forward(args(), index=index.float())
    with pytest.raises(ValueError, match="targets must be int64"):
        forward(args(), targets=targets[:-1])


# ------------------------------------------------------------------ the public op

def test_op_triton_backend_matches_torch_backend():
    from fastmlm.ops.dispatch import use_backend
    from fastmlm.ops.mlm_head import mlm_head

    params, index, targets, _ = make_inputs(*SMALL, torch.float32, seed=4, duplicates=True)
    results = {}
    for backend in ("torch", "triton"):
        leaves = {k: None if v is None else v.clone().requires_grad_() for k, v in params.items()}
        with use_backend(backend, "mlm_head"):
            loss = mlm_head(leaves["hidden_all"], index, *[leaves[k] for k in PARAM_NAMES[1:]], targets,
                            label_smoothing=0.1, z_loss=1e-3)
            loss.backward()
        results[backend] = (loss, [leaves[k].grad for k in PARAM_NAMES])
    assert_close(results["triton"][0], results["torch"][0], torch.float32, "loss")
    for name, a, e in zip(PARAM_NAMES, results["triton"][1], results["torch"][1]):
        assert_close(a, e, torch.float32, f"grad of {name}")


def test_op_passes_opcheck():
    import fastmlm.ops  # noqa: F401  (registers fastmlm::mlm_head)
    from fastmlm.ops.dispatch import use_backend

    params, index, targets, _ = make_inputs(*SHAPES[0], torch.float32, seed=5)
    params = {k: None if v is None else v.requires_grad_() for k, v in params.items()}
    args = (params["hidden_all"], index, *[params[k] for k in PARAM_NAMES[1:]], targets, EPS, IGNORE, 0.1, 1e-3)
    with use_backend("triton", "mlm_head"):
        torch.library.opcheck(torch.ops.fastmlm.mlm_head.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
