"""Forward kernel of fused attention over packed variable-length sequences.

FlashAttention-2 scheme: one program owns BLOCK_M query rows of one sequence and
one head, streams that sequence's keys/values in BLOCK_N blocks and keeps a
running (max, sum, accumulator) per row, so no [seq, seq] tensor ever exists.
The softmax runs in base 2 (`exp2`, scores pre-multiplied by scale * log2(e)),
which is one multiply cheaper per score than `exp`; lse is stored in base e.

Semantics (docs/ops.md, `attention`): query i of a sequence with Lq queries and
Lk keys sees keys j < Lk, and with `CAUSAL` only j <= i + Lk - Lq. Dropout
removes weight (global query row, global key row, head) when the shared
counter hash says so; the kept weights are scaled by 1 / (1 - p).

The wrappers that launch this kernel are in `attention.py`.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastmlm.kernels.triton.offsets import widen
from fastmlm.kernels.triton.random import counter_hash_prefix, fmix32, keep_mask, load_seed_words

# constexpr: jitted code may only read globals declared so.
LN2 = tl.constexpr(0.6931471805599453)
STREAM_DROPOUT = tl.constexpr(0x100)  # fastmlm.reference.random.STREAM_DROPOUT; the stream is this + head


@triton.jit
def _attend_key_block(
    acc, row_max, row_sum, q, k_base, v_base, n0, offs_m, offs_n, offs_d,
    k_len, diag_offset, k_start, row_hash, drop_threshold, softmax_scale_log2,
    stride_k_t, stride_k_d, stride_v_t, stride_v_d,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over keys [n0, n0 + BLOCK_N) of one sequence.

    `MASKED=False` is only used for blocks where every key exists and every
    row sees every key, so it skips the bounds and causal masks.
    """
    cols = n0 + offs_n
    kt_ptrs = k_base + cols[None, :] * stride_k_t + offs_d[:, None] * stride_k_d
    v_ptrs = v_base + cols[:, None] * stride_v_t + offs_d[None, :] * stride_v_d
    if MASKED:
        key_in = cols < k_len
        if BLOCK_D == HEAD_DIM:
            kt = tl.load(kt_ptrs, mask=key_in[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=key_in[:, None], other=0.0)
        else:
            d_in = offs_d < HEAD_DIM
            kt = tl.load(kt_ptrs, mask=key_in[None, :] & d_in[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=key_in[:, None] & d_in[None, :], other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        else:
            d_in = offs_d < HEAD_DIM
            kt = tl.load(kt_ptrs, mask=d_in[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_in[None, :], other=0.0)

    scores = tl.dot(q, kt, input_precision=DOT_PRECISION) * softmax_scale_log2
    if MASKED:
        visible = cols[None, :] < k_len
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + diag_offset)
        scores = tl.where(visible, scores, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, 1))
    if MASKED:
        # A row may have seen no key yet: subtract 0 instead of -inf so that
        # exp2(-inf - -inf) never makes a NaN; its weights stay exactly 0.
        new_max_safe = tl.where(new_max == float("-inf"), 0.0, new_max)
    else:
        new_max_safe = new_max
    weights = tl.exp2(scores - new_max_safe[:, None])
    rescale = tl.exp2(row_max - new_max_safe)
    row_sum = row_sum * rescale + tl.sum(weights, 1)
    acc = acc * rescale[:, None]
    if DROPOUT:
        # lse and the normaliser use the weights before dropout; only the
        # product with V sees the dropped weights (scaled once at the end).
        keep = keep_mask(row_hash, (k_start + cols).to(tl.uint32), drop_threshold)
        weights = tl.where(keep, weights, 0.0)
    acc = tl.dot(weights.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, new_max, row_sum


@triton.jit(do_not_specialize=["drop_threshold"])
def attention_forward_kernel(
    Q, K, V, Out, Lse, cu_seqlens_q, cu_seqlens_k,
    stride_q_t, stride_q_h, stride_q_d,
    stride_k_t, stride_k_h, stride_k_d,
    stride_v_t, stride_v_h, stride_v_d,
    stride_o_t, stride_o_h, stride_o_d,
    stride_lse_h,
    softmax_scale_log2, dropout_scale, Seed, drop_threshold,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE_ROWS: tl.constexpr,
):
    """Attention forward for BLOCK_M query rows of one sequence and one head.

    Grid: (cdiv(max_seqlen_q, BLOCK_M), batch, heads).
    Q [Tq, heads, D], K/V [Tk, heads, D], Out [Tq, heads, D]: any strides,
    given as stride_<tensor>_{t,h,d} (token, head, feature). Lse fp32 [heads, Tq]
    with head stride `stride_lse_h` and token stride 1.
    cu_seqlens_q/k: int32 [batch + 1] row offsets of each sequence.
    softmax_scale_log2: softmax_scale * log2(e). dropout_scale: 1 / (1 - p).
    Seed: 0-d int64 tensor, the dropout seed, read in the kernel only when
    DROPOUT (no host read; a CUDA graph replays the tensor's current value);
    drop_threshold: threshold24(p).
    HEAD_DIM: D; BLOCK_D: next power of two >= D (extra features masked).
    BLOCK_M/BLOCK_N: query/key rows per tile. CAUSAL, DROPOUT: compile-time
    switches. DOT_PRECISION: tl.dot input precision ("ieee" for fp32 inputs).
    WIDE_ROWS: row offsets in int64 (set when row x row stride can reach 2**31).
    """
    block_m = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q + seq)
    q_len = tl.load(cu_seqlens_q + seq + 1) - q_start
    m0 = block_m * BLOCK_M
    if m0 >= q_len:
        return  # grid is sized for the longest sequence
    k_start = tl.load(cu_seqlens_k + seq)
    k_len = tl.load(cu_seqlens_k + seq + 1) - k_start

    # Row offsets within the sequence, times a row stride: int64 where that can pass 2**31 (offsets.py).
    offs_m = widen(m0 + tl.arange(0, BLOCK_M), WIDE_ROWS)
    offs_n = widen(tl.arange(0, BLOCK_N), WIDE_ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    row_in = offs_m < q_len
    d_in = offs_d < HEAD_DIM
    # Sequence-start and head offsets are int64: packed batches (and head-major views of
    # them) can exceed 2**31 elements.
    q_ptrs = (Q + q_start.to(tl.int64) * stride_q_t + head.to(tl.int64) * stride_q_h
              + offs_m[:, None] * stride_q_t + offs_d[None, :] * stride_q_d)
    q = tl.load(q_ptrs, mask=row_in[:, None] & d_in[None, :], other=0.0)
    k_base = K + k_start.to(tl.int64) * stride_k_t + head.to(tl.int64) * stride_k_h
    v_base = V + k_start.to(tl.int64) * stride_v_t + head.to(tl.int64) * stride_v_h

    # Keys [0, n_full) are seen by every row of this tile (no masks); keys
    # [n_full, n_end) need masks; keys >= n_end are invisible to all rows.
    diag_offset = k_len - q_len
    if CAUSAL:
        n_end = tl.minimum(k_len, m0 + BLOCK_M + diag_offset)
        n_full = tl.minimum(k_len, m0 + 1 + diag_offset)
    else:
        n_end = k_len
        n_full = k_len
    n_full = (tl.maximum(n_full, 0) // BLOCK_N) * BLOCK_N

    if DROPOUT:
        seed_lo, seed_hi = load_seed_words(Seed)
        prefix = counter_hash_prefix(seed_lo, seed_hi, head + STREAM_DROPOUT)
        row_hash = fmix32(prefix ^ (q_start + offs_m).to(tl.uint32))
    else:
        row_hash = offs_m.to(tl.uint32)  # unused

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, n_full, BLOCK_N):
        acc, row_max, row_sum = _attend_key_block(
            acc, row_max, row_sum, q, k_base, v_base, n0, offs_m, offs_n, offs_d,
            k_len, diag_offset, k_start, row_hash, drop_threshold, softmax_scale_log2,
            stride_k_t, stride_k_d, stride_v_t, stride_v_d,
            HEAD_DIM, BLOCK_D, False, CAUSAL, DROPOUT, DOT_PRECISION)
    for n0 in range(n_full, n_end, BLOCK_N):
        acc, row_max, row_sum = _attend_key_block(
            acc, row_max, row_sum, q, k_base, v_base, n0, offs_m, offs_n, offs_d,
            k_len, diag_offset, k_start, row_hash, drop_threshold, softmax_scale_log2,
            stride_k_t, stride_k_d, stride_v_t, stride_v_d,
            HEAD_DIM, BLOCK_D, True, CAUSAL, DROPOUT, DOT_PRECISION)

    # A row that saw no key (empty key sequence, or causal with Lq > Lk) has
    # row_sum 0: its output is 0 and its lse -inf, as the contract says.
    no_key = row_sum == 0.0
    row_sum_safe = tl.where(no_key, 1.0, row_sum)
    out = acc / row_sum_safe[:, None]
    if DROPOUT:
        out = out * dropout_scale
    lse = tl.where(no_key, float("-inf"), (row_max + tl.log2(row_sum_safe)) * LN2)

    o_ptrs = (Out + q_start.to(tl.int64) * stride_o_t + head.to(tl.int64) * stride_o_h
              + offs_m[:, None] * stride_o_t + offs_d[None, :] * stride_o_d)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_in[:, None] & d_in[None, :])
    tl.store(Lse + head.to(tl.int64) * stride_lse_h + q_start + offs_m, lse, mask=row_in)
