"""Triton streamed cross-entropy vs the fp64 reference (fastmlm/reference/cross_entropy.py).

Without CUDA the kernels run in the Triton interpreter on CPU tensors with tiny
shapes; with CUDA the same tests run on the GPU with larger shapes, bf16 and
bert-base's vocabulary (V = 30522).
"""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit functions are defined (before the kernel import below).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastmlm.kernels.triton.cross_entropy import cross_entropy_backward, cross_entropy_forward  # noqa: E402
from fastmlm.reference import cross_entropy as reference  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and os.environ.get("TRITON_INTERPRET", "0") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

# bf16 runs in the interpreter too: fastmlm's interpreter shim widens bf16 dot operands.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, H, V): M = 1, sizes not multiples of any block, V prime.
SHAPES = [(1, 16, 37), (5, 24, 100), (17, 16, 37)] if not CUDA else \
    [(1, 64, 37), (17, 96, 1000), (300, 768, 30522), (2000, 128, 4099)]
# Explicit configs (block sizes, vocabulary splits); None = the module's default choice.
CONFIGS = [dict(BLOCK_M=16, BLOCK_V=32, BLOCK_K=16, VOCAB_SPLITS=1),
           dict(BLOCK_M=32, BLOCK_V=16, BLOCK_K=32, VOCAB_SPLITS=3)] if not CUDA else \
    [dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, VOCAB_SPLITS=4, num_warps=8, num_stages=3),
     dict(BLOCK_M=32, BLOCK_V=64, BLOCK_K=32, VOCAB_SPLITS=1, num_warps=4, num_stages=2), None]
IGNORE = -100


def make_inputs(M, H, V, dtype, *, bias=True, weight_scale=1.0, seed=0, ignore_every=4):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(M, H, generator=gen) / H ** 0.25
    weight = torch.randn(V, H, generator=gen) * weight_scale / H ** 0.25
    b = torch.randn(V, generator=gen) if bias else None
    targets = torch.randint(0, V, (M,), generator=gen)
    targets[::ignore_every] = IGNORE  # row 0 is always ignored; M = 1 is then covered below
    grad = torch.rand(M, generator=gen) + 0.5
    to = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return to(hidden), to(weight), to(b), targets.to(DEVICE), grad.to(DEVICE)


def check_against_reference(hidden, weight, bias, targets, grad, *, ls=0.0, zl=0.0, config=None,
                            deterministic=False):
    dtype = hidden.dtype
    opts = dict(ignore_index=IGNORE, label_smoothing=ls, z_loss=zl)
    row_loss, lse = cross_entropy_forward(hidden, weight, bias, targets, config=config, **opts)
    d_hidden, d_weight, d_bias = cross_entropy_backward(grad, hidden, weight, bias, targets, lse, config=config,
                                                        deterministic=deterministic, **opts)
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    ref_loss, ref_lse = reference.cross_entropy_forward(f64(hidden), f64(weight), f64(bias), targets, **opts)
    ref_dh, ref_dw, ref_db = reference.cross_entropy_backward(grad.double(), f64(hidden), f64(weight), f64(bias),
                                                              targets, ref_lse, **opts)
    assert row_loss.dtype == torch.float32 and lse.dtype == torch.float32
    assert d_hidden.dtype == dtype and d_weight.dtype == dtype
    # Forward in fp32 from the same rounded inputs: tight whatever the input dtype.
    assert_close(row_loss, ref_loss, torch.float32, "row_loss")
    assert_close(lse, ref_lse, torch.float32, "lse")
    assert (row_loss[targets == IGNORE] == 0).all()
    assert_close(d_hidden, ref_dh, dtype, "d_hidden")
    assert_close(d_weight, ref_dw, dtype, "d_weight")
    if bias is None:
        assert d_bias is None
    else:
        assert d_bias.dtype == dtype
        assert_close(d_bias, ref_db, dtype, "d_bias")
    return d_hidden, d_weight, d_bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_matches_reference(shape, dtype, deterministic):
    hidden, weight, bias, targets, grad = make_inputs(*shape, dtype, ignore_every=3)
    if shape[0] == 1:
        targets[0] = 5  # a single live row
    check_against_reference(hidden, weight, bias, targets, grad, deterministic=deterministic)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_configs_with_smoothing_and_z_loss(config, dtype):
    hidden, weight, bias, targets, grad = make_inputs(*SHAPES[-1], dtype, seed=1)
    for deterministic in (False, True):
        check_against_reference(hidden, weight, bias, targets, grad, ls=0.1, zl=1e-3, config=config,
                                deterministic=deterministic)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_bias(dtype):
    hidden, weight, _, targets, grad = make_inputs(*SHAPES[1], dtype, bias=False, seed=2)
    check_against_reference(hidden, weight, None, targets, grad, ls=0.2)


@pytest.mark.parametrize("deterministic", [False, True])
def test_fp16_gradients_of_a_mean_over_many_rows(deterministic):
    # g = 1/4096 (a mean over 4096 masked rows) times softmax ~ 1/V is below fp16's
    # smallest subnormal: narrowed as is, the softmax part of dz vanished, leaving
    # d_hidden = -g * w[target] and zero rows of d_weight. Each dz tile is scaled into
    # fp16's range first. Measured here: d_hidden relative error 3.7e-3 unscaled, 7.3e-4
    # scaled against a floor of 7.2e-4; d_weight's non-target rows at the floor, 0.019.
    M, V, H = (32, 2048, 32) if not CUDA else (512, 30522, 256)
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(M, H, generator=gen).half().to(DEVICE)
    weight = (0.1 * torch.randn(V, H, generator=gen)).half().to(DEVICE)
    targets = torch.randint(0, V, (M,), generator=gen).to(DEVICE)
    grad = torch.full((M,), 2.0 ** -12, device=DEVICE)
    options = dict(ignore_index=-100, label_smoothing=0.0, z_loss=0.0)
    _, lse = cross_entropy_forward(hidden, weight, None, targets, **options)
    d_hidden, d_weight, _ = cross_entropy_backward(grad, hidden, weight, None, targets, lse,
                                                   deterministic=deterministic, **options)
    z = hidden.double() @ weight.double().T
    dz = torch.softmax(z, 1)
    dz[torch.arange(M), targets] -= 1
    dz *= 2.0 ** -12
    non_target = torch.ones(V, dtype=torch.bool, device=DEVICE)
    non_target[targets] = False
    relative = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    # The gradients are returned in fp16, small enough to be subnormal there: the error of
    # rounding the exact values to fp16 is the floor any kernel has.
    for name, got, exact in (("d_hidden", d_hidden, dz @ weight.double()),
                             ("d_weight", d_weight[non_target], (dz.T @ hidden.double())[non_target])):
        floor = relative(exact.half(), exact)
        assert relative(got, exact) < 1.5 * floor + 1e-4, (name, relative(got, exact), floor)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_magnitude_logits(dtype):
    # Logits of a few hundred: exp overflows fp32 without the running-max subtraction.
    hidden, weight, bias, targets, grad = make_inputs(*SHAPES[1], dtype, weight_scale=100.0, seed=3)
    row_loss, lse = cross_entropy_forward(hidden, weight, bias, targets, ignore_index=IGNORE,
                                          label_smoothing=0.0, z_loss=0.0)
    assert torch.isfinite(row_loss).all() and lse.abs().max() > 100
    check_against_reference(hidden, weight, bias, targets, grad, ls=0.1, zl=1e-4)


@pytest.mark.parametrize("deterministic", [False, True])
def test_all_rows_ignored(deterministic):
    hidden, weight, bias, targets, grad = make_inputs(*SHAPES[1], torch.float32, seed=4)
    targets.fill_(IGNORE)
    opts = dict(ignore_index=IGNORE, label_smoothing=0.1, z_loss=1e-3)
    row_loss, lse = cross_entropy_forward(hidden, weight, bias, targets, **opts)
    assert torch.equal(row_loss, torch.zeros_like(row_loss)) and torch.isfinite(lse).all()
    grads = cross_entropy_backward(grad, hidden, weight, bias, targets, lse, deterministic=deterministic, **opts)
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_hidden_and_strided_grad(dtype):
    hidden, weight, bias, targets, grad = make_inputs(*SHAPES[1], dtype, seed=5)
    wide = torch.randn(hidden.shape[0], 3 * hidden.shape[1], device=DEVICE).to(dtype)
    wide[:, 1::3] = hidden  # column stride 3, row stride 3H
    strided = wide[:, 1::3]
    assert not strided.is_contiguous()
    grad_wide = torch.stack([grad, torch.full_like(grad, float("nan"))], 1)[:, 0]  # stride 2
    check_against_reference(strided, weight, bias, targets, grad_wide, ls=0.1)


def test_ignore_index_is_configurable():
    hidden, weight, bias, targets, grad = make_inputs(*SHAPES[1], torch.float32, seed=6, ignore_every=2)
    targets[targets == IGNORE] = 0  # 0 is a real class for -100 ...
    row_loss, _ = cross_entropy_forward(hidden, weight, bias, targets, ignore_index=0,
                                        label_smoothing=0.0, z_loss=0.0)
    assert (row_loss[targets == 0] == 0).all() and (row_loss[targets != 0] > 0).all()


def test_out_of_range_target_makes_its_row_nan():
    # The kernel API takes targets as given (the op checks values, except with value checks
    # off): a target outside [0, V) must give NaN, as the compiled CUDA kernel does, not a
    # plausible loss.
    hidden, weight, bias, targets, grad = make_inputs(*SHAPES[1], torch.float32, seed=7)
    targets[targets == IGNORE] = 1
    V = weight.shape[0]
    targets[2], targets[4] = V, -7
    row_loss, _ = cross_entropy_forward(hidden, weight, bias, targets, ignore_index=IGNORE,
                                        label_smoothing=0.0, z_loss=0.0)
    bad = torch.zeros_like(row_loss, dtype=torch.bool)
    bad[[2, 4]] = True
    assert row_loss[bad].isnan().all() and row_loss[~bad].isfinite().all()


def test_deterministic_mode_is_bitwise_repeatable():
    hidden, weight, bias, targets, grad = make_inputs(*SHAPES[-1], torch.float32, seed=7)
    opts = dict(ignore_index=IGNORE, label_smoothing=0.1, z_loss=1e-3, deterministic=True)
    _, lse = cross_entropy_forward(hidden, weight, bias, targets, ignore_index=IGNORE, label_smoothing=0.1,
                                   z_loss=1e-3)
    first = cross_entropy_backward(grad, hidden, weight, bias, targets, lse, **opts)
    second = cross_entropy_backward(grad, hidden, weight, bias, targets, lse, **opts)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_empty_rows():
    hidden, weight, bias, targets, grad = make_inputs(*SHAPES[1], torch.float32)
    row_loss, lse = cross_entropy_forward(hidden[:0], weight, bias, targets[:0], ignore_index=IGNORE,
                                          label_smoothing=0.0, z_loss=0.0)
    assert row_loss.shape == (0,) and lse.shape == (0,)
    d_hidden, d_weight, d_bias = cross_entropy_backward(grad[:0], hidden[:0], weight, bias, targets[:0], lse,
                                                        ignore_index=IGNORE, label_smoothing=0.0, z_loss=0.0)
    assert d_hidden.shape == (0, hidden.shape[1]) and not d_weight.any() and not d_bias.any()


def test_bad_inputs_raise_before_launch():
    hidden, weight, bias, targets, grad = make_inputs(*SHAPES[1], torch.float32)
    opts = dict(ignore_index=IGNORE, label_smoothing=0.0, z_loss=0.0)
    with pytest.raises(ValueError, match="does not match hidden size"):
        cross_entropy_forward(hidden, weight[:, :-1], bias, targets, **opts)
    with pytest.raises(TypeError, match="share one dtype"):
        cross_entropy_forward(hidden, weight.half(), bias, targets, **opts)
    with pytest.raises(ValueError, match="targets must be int64"):
        cross_entropy_forward(hidden, weight, bias, targets.int(), **opts)
    with pytest.raises(ValueError, match="bias must be"):
        cross_entropy_forward(hidden, weight, bias[:-1], targets, **opts)
    with pytest.raises(ValueError, match="lse must be fp32"):
        cross_entropy_backward(grad, hidden, weight, bias, targets, grad.double(), **opts)
    with pytest.raises(ValueError, match="power of two"):
        cross_entropy_forward(hidden, weight, bias, targets, config=dict(BLOCK_V=24), **opts)
    with pytest.raises(ValueError, match="unknown config keys"):
        cross_entropy_forward(hidden, weight, bias, targets, config=dict(BLOCK_N=32), **opts)
    if CUDA:
        with pytest.raises(ValueError, match="one device"):
            cross_entropy_forward(hidden, weight.cpu(), bias, targets, **opts)
