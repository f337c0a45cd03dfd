"""Streamed vocabulary cross-entropy (the `mlm_cross_entropy` op) in Triton.

Logits z = hidden @ weight.T + bias are produced one [BLOCK_M, BLOCK_V] tile at a
time on chip and folded into an online log-sum-exp; the full [M, V] logits never
exist in memory, in forward or backward. Semantics: docs/ops.md `mlm_cross_entropy`.

Forward: a grid of (row blocks, vocabulary splits). Each program streams its share of
the vocabulary and writes four fp32 partials per row (running max, sum of exp below
that max, target logit, sum of logits); a second small kernel merges the splits.
Splitting the vocabulary matters when M is small (bert-base: ~150 masked rows, i.e.
3 row blocks for 132 SMs); with enough rows the split count is 1.

Backward (logit tiles recomputed from `lse`):
  * default: one kernel gridded over (row blocks, vocab blocks) that adds its
    d_hidden / d_weight / d_bias contributions with fp32 atomics. It recomputes each
    logit tile exactly once; the order of the atomic adds is not fixed.
  * deterministic: a d_hidden kernel gridded over (row blocks, vocab splits) writing
    one fp32 partial per split (summed afterwards in a fixed order), and a d_weight
    kernel gridded over vocab blocks that loops over every row block. Each program
    owns the rows it read-modify-writes, so no atomics; the logits are recomputed twice.
The gradient GEMMs take dz in the input dtype (fp32 accumulation). For fp16, whose
smallest subnormal is 6e-8, dz = g * softmax is often smaller (g = 1/4096 for a mean
over 4096 rows, softmax ~ 1/V): each tile of dz is first scaled by a power of two that
puts its largest entry in [2**14, 2**15), and the product is scaled back in fp32, both
exact. Without it every non-target row of d_weight came out 0 in such a step.
"""
import os

import torch
import triton
import triton.language as tl

from fastmlm.kernels.triton.launch_device import on_input_device
from fastmlm.kernels.triton.offsets import unit_column_stride

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# A fixed small config in the interpreter: every program instance costs milliseconds there.
_INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_V=32, BLOCK_K=16, VOCAB_SPLITS=1, num_warps=4, num_stages=1)
_CONFIG_KEYS = {"BLOCK_M", "BLOCK_V", "BLOCK_K", "VOCAB_SPLITS", "num_warps", "num_stages", "DOT_PRECISION"}


@triton.jit
def _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, H,
                stride_hm, stride_hk, stride_wv, stride_wk,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """z[rows, cols] in fp32: hidden [M, H] (strides stride_hm, stride_hk) times the
    transpose of weight [V, H] (strides stride_wv, stride_wk), plus bias [V]."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < H
        h = tl.load(hidden_ptr + rows[:, None] * stride_hm + ks[None, :] * stride_hk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(weight_ptr + cols[None, :] * stride_wv + ks[:, None] * stride_wk,
                    mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _ce_forward_partials_kernel(
        hidden_ptr, weight_ptr, bias_ptr, targets_ptr,
        part_max_ptr, part_sumexp_ptr, part_target_ptr, part_sum_ptr,
        M, V, H, stride_hm, stride_hk, stride_wv, stride_wk, stride_t,
        ignore_index, blocks_per_split,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program (row block, split) streams vocab blocks [split*blocks_per_split, ...)
    and writes the four partials, each a contiguous fp32 [splits, M] buffer."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < M
    target = tl.load(targets_ptr + rows * stride_t, mask=row_mask, other=ignore_index)
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    run_sumexp = tl.zeros((BLOCK_M,), tl.float32)
    target_logit = tl.zeros((BLOCK_M,), tl.float32)
    logit_sum = tl.zeros((BLOCK_M,), tl.float32)
    # Same trip count for every split; only the last split's tail blocks lie past V.
    for block in range(0, blocks_per_split):
        v0 = (split * blocks_per_split + block) * BLOCK_V
        if v0 < V:
            cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            col_mask = cols < V
            z = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, H,
                            stride_hm, stride_hk, stride_wv, stride_wk,
                            HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
            z_live = tl.where(col_mask[None, :], z, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(z_live, axis=1))
            # While a row has seen only -inf logits (a vocabulary block masked out by a
            # -inf bias) its max is -inf: shift by 0 there, so exp(-inf - -inf) is not NaN.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sumexp = run_sumexp * tl.exp(run_max - shift) + \
                tl.sum(tl.exp(z_live - shift[:, None]), axis=1)
            run_max = new_max
            target_logit += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
            logit_sum += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
    out = split * M + rows
    tl.store(part_max_ptr + out, run_max, mask=row_mask)
    tl.store(part_sumexp_ptr + out, run_sumexp, mask=row_mask)
    tl.store(part_target_ptr + out, target_logit, mask=row_mask)
    tl.store(part_sum_ptr + out, logit_sum, mask=row_mask)


@triton.jit
def _ce_forward_combine_kernel(
        part_max_ptr, part_sumexp_ptr, part_target_ptr, part_sum_ptr, targets_ptr,
        row_loss_ptr, lse_ptr, M, V, num_splits, stride_t, ignore_index,
        label_smoothing, z_loss, BLOCK_M: tl.constexpr):
    """Merges [num_splits, M] partials into lse [M] and row_loss [M] (fp32)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < M
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    run_sumexp = tl.zeros((BLOCK_M,), tl.float32)
    target_logit = tl.zeros((BLOCK_M,), tl.float32)
    logit_sum = tl.zeros((BLOCK_M,), tl.float32)
    for split in range(0, num_splits):
        at = split * M + rows
        part_max = tl.load(part_max_ptr + at, mask=row_mask, other=0.0)
        new_max = tl.maximum(run_max, part_max)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # as in the partials kernel
        run_sumexp = run_sumexp * tl.exp(run_max - shift) + \
            tl.load(part_sumexp_ptr + at, mask=row_mask, other=1.0) * tl.exp(part_max - shift)
        run_max = new_max
        target_logit += tl.load(part_target_ptr + at, mask=row_mask, other=0.0)
        logit_sum += tl.load(part_sum_ptr + at, mask=row_mask, other=0.0)
    lse = run_max + tl.log(run_sumexp)
    # The smoothing term only where smoothing is on: with a -inf logit, logit_sum is
    # -inf and 0 * inf would make every row NaN (the reference and C++ skip it too).
    smoothing = tl.where(label_smoothing != 0.0, label_smoothing * (lse - logit_sum / V), 0.0)
    loss = (1.0 - label_smoothing) * (lse - target_logit) + smoothing + z_loss * lse * lse
    target = tl.load(targets_ptr + rows * stride_t, mask=row_mask, other=ignore_index)
    # A target outside [0, V) (possible only with value checks off) makes its row NaN,
    # as in the compiled CUDA kernels, rather than a plausible loss.
    in_range = (target >= 0) & (target < V)
    loss = tl.where(target != ignore_index, tl.where(in_range, loss, float("nan")), 0.0)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(row_loss_ptr + rows, loss, mask=row_mask)


@triton.jit
def _dlogit_tile(z, cols, col_mask, row_live, target, lse, grad, V, label_smoothing, z_loss):
    """dz = g * ((1 + 2 z_loss lse) softmax - (1 - ls) onehot - ls / V), zero outside
    live rows (in range and not ignored) and real columns. `where`, not a product,
    so that exp of a padded row's logits cannot turn into inf * 0."""
    prob = tl.exp(z - lse[:, None])
    dz = (1.0 + 2.0 * z_loss * lse)[:, None] * prob - label_smoothing / V
    dz -= tl.where(cols[None, :] == target[:, None], 1.0 - label_smoothing, 0.0)
    dz = dz * grad[:, None]
    return tl.where(row_live[:, None] & col_mask[None, :], dz, 0.0)


@triton.jit
def _fp16_tile_scale(dz):
    """(2**e, 2**-e) with max|dz| * 2**e in [2**14, 2**15): dz * 2**e fits fp16 with its
    small entries out of the subnormal range. e comes from the exponent bits (exact, no
    exp2 approximation) and is clamped so both factors are normal fp32 numbers."""
    largest = tl.max(tl.abs(dz))
    exponent = ((largest.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2(largest))
    e = tl.minimum(tl.maximum(14 - exponent, -126), 126)
    return ((e + 127) << 23).to(tl.float32, bitcast=True), ((127 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _load_row_state(targets_ptr, lse_ptr, grad_ptr, rows, row_mask, stride_t, stride_g, ignore_index):
    target = tl.load(targets_ptr + rows * stride_t, mask=row_mask, other=ignore_index)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    grad = tl.load(grad_ptr + rows * stride_g, mask=row_mask, other=0.0)
    return target, lse, grad, row_mask & (target != ignore_index)


@triton.jit
def _ce_backward_atomic_kernel(
        grad_ptr, hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr,
        d_hidden_ptr, d_weight_ptr, d_bias_ptr,
        M, V, H, stride_g, stride_hm, stride_hk, stride_wv, stride_wk, stride_t,
        ignore_index, label_smoothing, z_loss,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program (row block, vocab block) adds dz @ weight into d_hidden fp32 [M, H],
    dz.T @ hidden into d_weight fp32 [V, H] and dz.sum(0) into d_bias fp32 [V]
    (all contiguous, zero-initialised) with atomics."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    row_mask = rows < M
    col_mask = cols < V
    target, lse, grad, row_live = _load_row_state(targets_ptr, lse_ptr, grad_ptr, rows, row_mask,
                                                  stride_t, stride_g, ignore_index)
    z = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, H,
                    stride_hm, stride_hk, stride_wv, stride_wk,
                    HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
    dz = _dlogit_tile(z, cols, col_mask, row_live, target, lse, grad, V, label_smoothing, z_loss)
    # The adds are relaxed: no program reads what they sum (later kernels do), and the
    # default acq_rel semantics put a GPU-wide fence and an L1 invalidate around each.
    if HAS_BIAS:
        tl.atomic_add(d_bias_ptr + cols, tl.sum(dz, axis=0), mask=col_mask, sem="relaxed")
    # The second GEMMs run at the input precision, like the forward (fp32 accumulation);
    # fp16 tiles are scaled into range first (module docstring).
    if hidden_ptr.dtype.element_ty == tl.float16:
        scale, unscale = _fp16_tile_scale(dz)
    else:
        scale, unscale = 1.0, 1.0
    dz_in = (dz * scale).to(hidden_ptr.dtype.element_ty)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < H
        w = tl.load(weight_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wk,
                    mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        tl.atomic_add(d_hidden_ptr + rows[:, None] * H + ks[None, :],
                      tl.dot(dz_in, w, input_precision=DOT_PRECISION) * unscale,
                      mask=row_mask[:, None] & k_mask[None, :], sem="relaxed")
        h = tl.load(hidden_ptr + rows[:, None] * stride_hm + ks[None, :] * stride_hk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        tl.atomic_add(d_weight_ptr + cols[:, None] * H + ks[None, :],
                      tl.dot(tl.trans(dz_in), h, input_precision=DOT_PRECISION) * unscale,
                      mask=col_mask[:, None] & k_mask[None, :], sem="relaxed")


@triton.jit
def _ce_backward_dhidden_kernel(
        grad_ptr, hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, d_hidden_parts_ptr,
        M, V, H, stride_g, stride_hm, stride_hk, stride_wv, stride_wk, stride_t,
        ignore_index, label_smoothing, z_loss, blocks_per_split,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program (row block, split) accumulates dz @ weight over its vocab blocks into
    d_hidden_parts fp32 [splits, M, H] (contiguous, zeroed), slice `split`, rows it owns."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    split = tl.program_id(1)
    row_mask = rows < M
    target, lse, grad, row_live = _load_row_state(targets_ptr, lse_ptr, grad_ptr, rows, row_mask,
                                                  stride_t, stride_g, ignore_index)
    out_ptr = d_hidden_parts_ptr + split.to(tl.int64) * M * H
    for block in range(0, blocks_per_split):  # same split walk as the forward
        v0 = (split * blocks_per_split + block) * BLOCK_V
        if v0 < V:
            cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            col_mask = cols < V
            z = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, H,
                            stride_hm, stride_hk, stride_wv, stride_wk,
                            HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
            dz = _dlogit_tile(z, cols, col_mask, row_live, target, lse, grad, V, label_smoothing, z_loss)
            # fp16: scaled into range (module docstring), its product added after unscaling;
            # other dtypes keep the dot's fused accumulator (no extra pass over the tile).
            if hidden_ptr.dtype.element_ty == tl.float16:
                scale, unscale = _fp16_tile_scale(dz)
                dz_in = (dz * scale).to(tl.float16)
            else:
                dz_in = dz.to(hidden_ptr.dtype.element_ty)
            # The previous block's stores may have come from other threads than this
            # block's loads of the same addresses (layouts differ): make them visible.
            tl.debug_barrier()
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_mask = ks < H
                w = tl.load(weight_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wk,
                            mask=col_mask[:, None] & k_mask[None, :], other=0.0)
                at = out_ptr + rows[:, None] * H + ks[None, :]
                tile_mask = row_mask[:, None] & k_mask[None, :]
                acc = tl.load(at, mask=tile_mask, other=0.0)
                if hidden_ptr.dtype.element_ty == tl.float16:
                    acc += tl.dot(dz_in, w, input_precision=DOT_PRECISION) * unscale
                else:
                    acc = tl.dot(dz_in, w, acc, input_precision=DOT_PRECISION)
                tl.store(at, acc, mask=tile_mask)


@triton.jit
def _ce_backward_dweight_kernel(
        grad_ptr, hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, d_weight_ptr, d_bias_ptr,
        M, V, H, stride_g, stride_hm, stride_hk, stride_wv, stride_wk, stride_t,
        ignore_index, label_smoothing, z_loss,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program (vocab block) loops over every row block, accumulating dz.T @ hidden into
    the rows of d_weight fp32 [V, H] (contiguous, zeroed) it owns, and dz.sum(0) into
    d_bias fp32 [V], in a fixed order."""
    cols = (tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    col_mask = cols < V
    bias_acc = tl.zeros((BLOCK_V,), tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = rows < M
        target, lse, grad, row_live = _load_row_state(targets_ptr, lse_ptr, grad_ptr, rows, row_mask,
                                                      stride_t, stride_g, ignore_index)
        z = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, H,
                        stride_hm, stride_hk, stride_wv, stride_wk,
                        HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
        dz = _dlogit_tile(z, cols, col_mask, row_live, target, lse, grad, V, label_smoothing, z_loss)
        bias_acc += tl.sum(dz, axis=0)
        if hidden_ptr.dtype.element_ty == tl.float16:  # as in _ce_backward_dhidden_kernel
            scale, unscale = _fp16_tile_scale(dz)
            dz_t = tl.trans((dz * scale).to(tl.float16))
        else:
            dz_t = tl.trans(dz.to(hidden_ptr.dtype.element_ty))
        tl.debug_barrier()  # see _ce_backward_dhidden_kernel
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < H
            h = tl.load(hidden_ptr + rows[:, None] * stride_hm + ks[None, :] * stride_hk,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            at = d_weight_ptr + cols[:, None] * H + ks[None, :]
            tile_mask = col_mask[:, None] & k_mask[None, :]
            acc = tl.load(at, mask=tile_mask, other=0.0)
            if hidden_ptr.dtype.element_ty == tl.float16:
                acc += tl.dot(dz_t, h, input_precision=DOT_PRECISION) * unscale
            else:
                acc = tl.dot(dz_t, h, acc, input_precision=DOT_PRECISION)
            tl.store(at, acc, mask=tile_mask)
    if HAS_BIAS:
        tl.store(d_bias_ptr + cols, bias_acc, mask=col_mask)


# ----------------------------------------------------------------------------- host side

def _sm_count(device):
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def resolve_config(M, V, H, dtype, device, config=None):
    """Block sizes and launch options. `config` entries override; the interpreter gets a
    fixed small config. On GPU a heuristic (no autotune: the backward accumulates
    into zeroed buffers, which autotune's repeated launches would corrupt)."""
    if config is not None and set(config) - _CONFIG_KEYS:
        raise ValueError(f"unknown config keys {sorted(set(config) - _CONFIG_KEYS)}; "
                         f"allowed: {sorted(_CONFIG_KEYS)}")
    if _INTERPRET or device.type != "cuda":
        resolved = dict(_INTERPRET_CONFIG)
    else:
        resolved = dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3)
        if dtype == torch.float32:  # ieee fp32 dot: smaller tiles keep registers in check
            resolved.update(BLOCK_M=32, BLOCK_V=64, BLOCK_K=32, num_warps=4, num_stages=2)
        row_blocks = triton.cdiv(max(M, 1), resolved["BLOCK_M"])
        # About two programs per SM in total; more splits only add partials to merge.
        resolved["VOCAB_SPLITS"] = max(1, (2 * _sm_count(device)) // row_blocks)
    resolved["DOT_PRECISION"] = "ieee" if dtype == torch.float32 else "tf32"
    resolved.update(config or {})
    for key in ("BLOCK_M", "BLOCK_V", "BLOCK_K"):
        size = resolved[key]
        if size < 16 or size & (size - 1):
            raise ValueError(f"config {key}={size} must be a power of two >= 16 (tl.dot tiles)")
    if resolved["VOCAB_SPLITS"] < 1:
        raise ValueError("config VOCAB_SPLITS must be >= 1")
    return resolved


def _vocab_split(V, block_v, splits):
    """(blocks_per_split, splits) with every split owning at least one vocab block."""
    vocab_blocks = triton.cdiv(V, block_v)
    blocks_per_split = triton.cdiv(vocab_blocks, min(splits, vocab_blocks))
    return blocks_per_split, triton.cdiv(vocab_blocks, blocks_per_split)


def check_inputs(hidden, weight, bias, targets, lse=None, grad_row_loss=None):
    """Raises ValueError/TypeError with a clear message before any launch."""
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden [M, H] and weight [V, H] must be 2-D, got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")
    M, H = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size H={H}")
    if V == 0 or H == 0:
        raise ValueError(f"empty vocabulary or hidden size (V={V}, H={H})")
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"hidden dtype {hidden.dtype} not in fp32/fp16/bf16")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError("hidden, weight and bias must share one dtype, got "
                        f"{hidden.dtype}, {weight.dtype}, {None if bias is None else bias.dtype}")
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"bias must be [V]={V}, got {tuple(bias.shape)}")
    if targets.dtype != torch.int64 or tuple(targets.shape) != (M,):
        raise ValueError(f"targets must be int64 [M]={M}, got {targets.dtype} {tuple(targets.shape)}")
    for name, t in (("lse", lse), ("grad_row_loss", grad_row_loss)):
        if t is not None and (t.dtype != torch.float32 or tuple(t.shape) != (M,)):
            raise ValueError(f"{name} must be fp32 [M]={M}, got {t.dtype} {tuple(t.shape)}")
    tensors = [t for t in (hidden, weight, bias, targets, lse, grad_row_loss) if t is not None]
    if any(t.device != hidden.device for t in tensors):
        raise ValueError(f"all tensors must be on one device, got {[str(t.device) for t in tensors]}")
    _check_device(hidden.device)
    return M, V, H


def _check_device(device: torch.device) -> None:
    if device.type != "cuda" and not _INTERPRET:
        raise RuntimeError("Triton cross-entropy needs CUDA tensors (or TRITON_INTERPRET=1 for CPU)")


def _launch_options(cfg):
    return dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_V=cfg["BLOCK_V"], BLOCK_K=cfg["BLOCK_K"],
                DOT_PRECISION=cfg["DOT_PRECISION"], num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"])


@on_input_device
def cross_entropy_forward(hidden, weight, bias, targets, *, ignore_index, label_smoothing, z_loss,
                          config=None):
    """Returns (row_loss fp32 [M], lse fp32 [M]) of docs/ops.md `mlm_cross_entropy`."""
    M, V, H = check_inputs(hidden, weight, bias, targets)
    hidden, weight = unit_column_stride(hidden), unit_column_stride(weight)
    device = hidden.device
    row_loss = torch.full((M,), float("nan"), dtype=torch.float32, device=device)
    lse = torch.full((M,), float("nan"), dtype=torch.float32, device=device)
    if M == 0:
        return row_loss, lse
    cfg = resolve_config(M, V, H, hidden.dtype, device, config)
    blocks_per_split, splits = _vocab_split(V, cfg["BLOCK_V"], cfg["VOCAB_SPLITS"])
    parts = torch.empty((4, splits, M), dtype=torch.float32, device=device)
    # The bias is read with unit stride (a [V] copy if strided); never read when HAS_BIAS is False.
    bias_arg = bias.contiguous() if bias is not None else weight
    _ce_forward_partials_kernel[(triton.cdiv(M, cfg["BLOCK_M"]), splits)](
        hidden, weight, bias_arg, targets, parts[0], parts[1], parts[2], parts[3],
        M, V, H, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        targets.stride(0), ignore_index, blocks_per_split,
        HAS_BIAS=bias is not None, **_launch_options(cfg))
    combine_rows = 16 if _INTERPRET else 128
    _ce_forward_combine_kernel[(triton.cdiv(M, combine_rows),)](
        parts[0], parts[1], parts[2], parts[3], targets, row_loss, lse, M, V, splits,
        targets.stride(0), ignore_index, float(label_smoothing), float(z_loss),
        BLOCK_M=combine_rows)
    return row_loss, lse


@on_input_device
def cross_entropy_backward(grad_row_loss, hidden, weight, bias, targets, lse, *, ignore_index,
                           label_smoothing, z_loss, deterministic=False, config=None):
    """Returns (d_hidden, d_weight, d_bias or None) in the input dtype; see module docstring."""
    M, V, H = check_inputs(hidden, weight, bias, targets, lse, grad_row_loss)
    hidden, weight = unit_column_stride(hidden), unit_column_stride(weight)
    device, dtype = hidden.device, hidden.dtype
    lse = lse.contiguous()
    if M == 0:
        return (torch.zeros_like(hidden), torch.zeros_like(weight),
                None if bias is None else torch.zeros_like(bias))
    cfg = resolve_config(M, V, H, dtype, device, config)
    opts = _launch_options(cfg)
    bias_arg = bias.contiguous() if bias is not None else weight
    common = (M, V, H, grad_row_loss.stride(0), hidden.stride(0), hidden.stride(1),
              weight.stride(0), weight.stride(1), targets.stride(0),
              ignore_index, float(label_smoothing), float(z_loss))
    # fp32 accumulators; for fp32 inputs the final `.to` is a no-op (no copy).
    d_weight = torch.zeros((V, H), dtype=torch.float32, device=device)
    d_bias = torch.zeros((V,), dtype=torch.float32, device=device) if bias is not None else None
    d_bias_arg = d_bias if d_bias is not None else d_weight
    if not deterministic:
        d_hidden = torch.zeros((M, H), dtype=torch.float32, device=device)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(V, cfg["BLOCK_V"]))
        _ce_backward_atomic_kernel[grid](
            grad_row_loss, hidden, weight, bias_arg, targets, lse, d_hidden, d_weight, d_bias_arg,
            *common, HAS_BIAS=bias is not None, **opts)
    else:
        blocks_per_split, splits = _vocab_split(V, cfg["BLOCK_V"], cfg["VOCAB_SPLITS"])
        d_hidden_parts = torch.zeros((splits, M, H), dtype=torch.float32, device=device)
        _ce_backward_dhidden_kernel[(triton.cdiv(M, cfg["BLOCK_M"]), splits)](
            grad_row_loss, hidden, weight, bias_arg, targets, lse, d_hidden_parts,
            *common, blocks_per_split, HAS_BIAS=bias is not None, **opts)
        d_hidden = d_hidden_parts[0] if splits == 1 else d_hidden_parts.sum(0)
        _ce_backward_dweight_kernel[(triton.cdiv(V, cfg["BLOCK_V"]),)](
            grad_row_loss, hidden, weight, bias_arg, targets, lse, d_weight, d_bias_arg,
            *common, HAS_BIAS=bias is not None, **opts)
    return (d_hidden.to(dtype), d_weight.to(dtype), None if d_bias is None else d_bias.to(dtype))
