"""Backward kernels of fused attention over packed variable-length sequences.

With P the softmax weights (recomputed from q, k and the saved lse), Z the
dropout keep mask scaled by 1 / (1 - p), and O = (P * Z) V:

    dV = (P * Z)^T dO
    dP = (dO V^T) * Z
    dS = P * (dP - delta),   delta_i = sum_j P_ij dP_ij = rowsum(dO * O)_i
    dQ = scale * dS K,       dK = scale * dS^T Q

Three kernels, no atomics, so results are bitwise deterministic:
  * `attention_backward_delta_kernel`: delta = rowsum(dO * O), fp32 [heads, Tq].
  * `attention_backward_dkdv_kernel`: one program per key block accumulates dK
    and dV over the query blocks that see it.
  * `attention_backward_dq_kernel`: one program per query block accumulates dQ
    over the key blocks it sees.
The price of no atomics is computing Q K^T and dO V^T twice (once per kernel);
the FA2 single-kernel variant instead adds dQ with atomics, which makes dQ
depend on the order in which programs finish.

The dropout mask is regenerated from the counter hash exactly as the forward
kernel made it. The wrappers are in `attention.py`.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastmlm.kernels.triton.attention_fwd import STREAM_DROPOUT
from fastmlm.kernels.triton.offsets import widen
from fastmlm.kernels.triton.random import counter_hash_prefix, fmix32, keep_mask, load_seed_words

LOG2E = tl.constexpr(1.4426950408889634)  # constexpr: jitted code may only read such globals


@triton.jit
def attention_backward_delta_kernel(
    Out, GradOut, Delta, num_rows,
    stride_o_t, stride_o_h, stride_o_d,
    stride_do_t, stride_do_h, stride_do_d,
    stride_delta_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] in fp32.

    Grid: (cdiv(Tq, BLOCK_T), heads). Out/GradOut [Tq, heads, D] any strides;
    Delta fp32 [heads, Tq] with head stride `stride_delta_h`, token stride 1.
    """
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t < num_rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + head.to(tl.int64) * stride_o_h + offs_t[:, None].to(tl.int64) * stride_o_t
                + offs_d[None, :] * stride_o_d, mask=mask, other=0.0)
    do = tl.load(GradOut + head.to(tl.int64) * stride_do_h + offs_t[:, None].to(tl.int64) * stride_do_t
                 + offs_d[None, :] * stride_do_d, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + head.to(tl.int64) * stride_delta_h + offs_t, delta, mask=offs_t < num_rows)


@triton.jit
def _load_rows(base, offs_rows, offs_d, num_rows, stride_t, stride_d,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr):
    """A [rows, BLOCK_D] tile; rows >= num_rows and features >= HEAD_DIM read as 0."""
    ptrs = base + offs_rows[:, None] * stride_t + offs_d[None, :] * stride_d
    if MASKED:
        mask = (offs_rows < num_rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
        return tl.load(ptrs, mask=mask, other=0.0)
    elif BLOCK_D == HEAD_DIM:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _load_row_stats(lse_base, delta_base, offs_rows, num_rows, MASKED: tl.constexpr):
    """lse in base 2 (-inf, a row that sees no key, read as 0) and delta."""
    if MASKED:
        lse = tl.load(lse_base + offs_rows, mask=offs_rows < num_rows, other=0.0)
        delta = tl.load(delta_base + offs_rows, mask=offs_rows < num_rows, other=0.0)
    else:
        lse = tl.load(lse_base + offs_rows)
        delta = tl.load(delta_base + offs_rows)
    lse = tl.where(lse == float("-inf"), 0.0, lse) * LOG2E
    return lse, delta


@triton.jit
def _dkdv_query_block(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, m0, offs_n, offs_d,
    q_len, k_len, diag_offset, q_start, k_rows_u32, prefix, drop_threshold,
    softmax_scale_log2, dropout_scale,
    stride_q_t, stride_q_d, stride_do_t, stride_do_d,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WIDE_ROWS: tl.constexpr,
):
    """Add query rows [m0, m0 + BLOCK_M) to dK, dV of one key block.

    Works in the transposed layout [keys, queries] so the key block is the
    left operand of every product. `MASKED=False` only where all rows and keys
    exist and every query sees every key.
    """
    offs_m = widen(m0 + tl.arange(0, BLOCK_M), WIDE_ROWS)
    q = _load_rows(q_base, offs_m, offs_d, q_len, stride_q_t, stride_q_d, HEAD_DIM, BLOCK_D, MASKED)
    do = _load_rows(do_base, offs_m, offs_d, q_len, stride_do_t, stride_do_d, HEAD_DIM, BLOCK_D, MASKED)
    lse, delta = _load_row_stats(lse_base, delta_base, offs_m, q_len, MASKED)

    scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * softmax_scale_log2
    weights_t = tl.exp2(scores_t - lse[None, :])
    if MASKED:
        visible = (offs_m[None, :] < q_len) & (offs_n[:, None] < k_len)
        if CAUSAL:
            visible = visible & (offs_n[:, None] <= offs_m[None, :] + diag_offset)
        weights_t = tl.where(visible, weights_t, 0.0)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    if DROPOUT:
        row_hash = fmix32(prefix ^ (q_start + offs_m).to(tl.uint32))
        # hash = fmix32(row_hash ^ key): xor is symmetric, so swapping the
        # arguments gives the [keys, queries] mask directly.
        keep_t = keep_mask(k_rows_u32, row_hash, drop_threshold)
        dropped_t = tl.where(keep_t, weights_t * dropout_scale, 0.0)
        dp_t = tl.where(keep_t, dp_t * dropout_scale, 0.0)
    else:
        dropped_t = weights_t
    dv = tl.dot(dropped_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    ds_t = weights_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["drop_threshold"])
def attention_backward_dkdv_kernel(
    Q, K, V, GradOut, Lse, Delta, GradK, GradV, cu_seqlens_q, cu_seqlens_k,
    stride_q_t, stride_q_h, stride_q_d,
    stride_k_t, stride_k_h, stride_k_d,
    stride_v_t, stride_v_h, stride_v_d,
    stride_do_t, stride_do_h, stride_do_d,
    stride_dk_t, stride_dk_h, stride_dk_d,
    stride_dv_t, stride_dv_h, stride_dv_d,
    stride_lse_h, stride_delta_h,
    softmax_scale, softmax_scale_log2, dropout_scale, Seed, drop_threshold,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE_ROWS: tl.constexpr,
):
    """dK and dV for BLOCK_N key rows of one sequence and one head.

    Grid: (cdiv(max_seqlen_k, BLOCK_N), batch, heads). Q/GradOut [Tq, heads, D],
    K/V/GradK/GradV [Tk, heads, D], any strides (stride_<tensor>_{t,h,d}).
    Lse (natural log) and Delta: fp32 [heads, Tq], token stride 1.
    Other arguments as in `attention_forward_kernel`; BLOCK_M is the query
    tile streamed through this program, BLOCK_N the key rows it owns.
    """
    block_n = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    k_start = tl.load(cu_seqlens_k + seq)
    k_len = tl.load(cu_seqlens_k + seq + 1) - k_start
    n0 = block_n * BLOCK_N
    if n0 >= k_len:
        return
    q_start = tl.load(cu_seqlens_q + seq)
    q_len = tl.load(cu_seqlens_q + seq + 1) - q_start

    offs_n = widen(n0 + tl.arange(0, BLOCK_N), WIDE_ROWS)  # int64 when rows x stride can pass 2**31
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + k_start.to(tl.int64) * stride_k_t + head.to(tl.int64) * stride_k_h
    v_base = V + k_start.to(tl.int64) * stride_v_t + head.to(tl.int64) * stride_v_h
    k = _load_rows(k_base, offs_n, offs_d, k_len, stride_k_t, stride_k_d, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(v_base, offs_n, offs_d, k_len, stride_v_t, stride_v_d, HEAD_DIM, BLOCK_D, True)
    q_base = Q + q_start.to(tl.int64) * stride_q_t + head.to(tl.int64) * stride_q_h
    do_base = GradOut + q_start.to(tl.int64) * stride_do_t + head.to(tl.int64) * stride_do_h
    lse_base = Lse + head.to(tl.int64) * stride_lse_h + q_start
    delta_base = Delta + head.to(tl.int64) * stride_delta_h + q_start
    if DROPOUT:
        seed_lo, seed_hi = load_seed_words(Seed)
        prefix = counter_hash_prefix(seed_lo, seed_hi, head + STREAM_DROPOUT)
    else:
        prefix = tl.full((), 0, tl.uint32)  # unused
    k_rows_u32 = (k_start + offs_n).to(tl.uint32)

    # Query rows [m_begin, m_diag_end) see part of this key block (causal
    # diagonal, masked); from m_after on, full query tiles see all of it
    # (unmasked) unless the key block itself is ragged; the last partial
    # query tile is masked again. Rows < m_begin see none of these keys.
    diag_offset = k_len - q_len
    if CAUSAL:
        m_begin = tl.maximum(n0 - diag_offset, 0)
        m_diag_end = tl.minimum(tl.maximum(n0 + BLOCK_N - 1 - diag_offset, 0), q_len)
    else:
        m_begin = 0
        m_diag_end = 0
    m_after = m_begin + tl.cdiv(tl.maximum(m_diag_end - m_begin, 0), BLOCK_M) * BLOCK_M
    if n0 + BLOCK_N > k_len:
        m_full_end = m_after
    else:
        m_full_end = m_after + (tl.maximum(q_len - m_after, 0) // BLOCK_M) * BLOCK_M

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for m0 in range(m_begin, m_diag_end, BLOCK_M):
        dk, dv = _dkdv_query_block(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, m0, offs_n, offs_d,
            q_len, k_len, diag_offset, q_start, k_rows_u32, prefix, drop_threshold,
            softmax_scale_log2, dropout_scale, stride_q_t, stride_q_d, stride_do_t, stride_do_d,
            HEAD_DIM, BLOCK_D, BLOCK_M, True, CAUSAL, DROPOUT, DOT_PRECISION, WIDE_ROWS)
    for m0 in range(m_after, m_full_end, BLOCK_M):
        dk, dv = _dkdv_query_block(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, m0, offs_n, offs_d,
            q_len, k_len, diag_offset, q_start, k_rows_u32, prefix, drop_threshold,
            softmax_scale_log2, dropout_scale, stride_q_t, stride_q_d, stride_do_t, stride_do_d,
            HEAD_DIM, BLOCK_D, BLOCK_M, False, CAUSAL, DROPOUT, DOT_PRECISION, WIDE_ROWS)
    for m0 in range(m_full_end, q_len, BLOCK_M):
        dk, dv = _dkdv_query_block(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, m0, offs_n, offs_d,
            q_len, k_len, diag_offset, q_start, k_rows_u32, prefix, drop_threshold,
            softmax_scale_log2, dropout_scale, stride_q_t, stride_q_d, stride_do_t, stride_do_d,
            HEAD_DIM, BLOCK_D, BLOCK_M, True, CAUSAL, DROPOUT, DOT_PRECISION, WIDE_ROWS)

    dk = dk * softmax_scale
    store_mask = (offs_n < k_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    dk_ptrs = (GradK + k_start.to(tl.int64) * stride_dk_t + head.to(tl.int64) * stride_dk_h
               + offs_n[:, None] * stride_dk_t + offs_d[None, :] * stride_dk_d)
    dv_ptrs = (GradV + k_start.to(tl.int64) * stride_dv_t + head.to(tl.int64) * stride_dv_h
               + offs_n[:, None] * stride_dv_t + offs_d[None, :] * stride_dv_d)
    tl.store(dk_ptrs, dk.to(GradK.dtype.element_ty), mask=store_mask)
    tl.store(dv_ptrs, dv.to(GradV.dtype.element_ty), mask=store_mask)


@triton.jit
def _dq_key_block(
    dq, q, do, lse, delta, k_base, v_base, n0, offs_m, offs_d, k_len, diag_offset,
    k_start, row_hash, drop_threshold, softmax_scale_log2, dropout_scale,
    stride_k_t, stride_k_d, stride_v_t, stride_v_d,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE_ROWS: tl.constexpr,
):
    """Add keys [n0, n0 + BLOCK_N) to dQ of one query tile."""
    offs_n = widen(n0 + tl.arange(0, BLOCK_N), WIDE_ROWS)
    k = _load_rows(k_base, offs_n, offs_d, k_len, stride_k_t, stride_k_d, HEAD_DIM, BLOCK_D, MASKED)
    v = _load_rows(v_base, offs_n, offs_d, k_len, stride_v_t, stride_v_d, HEAD_DIM, BLOCK_D, MASKED)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * softmax_scale_log2
    weights = tl.exp2(scores - lse[:, None])
    if MASKED:
        visible = offs_n[None, :] < k_len
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag_offset)
        weights = tl.where(visible, weights, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if DROPOUT:
        keep = keep_mask(row_hash, (k_start + offs_n).to(tl.uint32), drop_threshold)
        dp = tl.where(keep, dp * dropout_scale, 0.0)
    ds = weights * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)


@triton.jit(do_not_specialize=["drop_threshold"])
def attention_backward_dq_kernel(
    Q, K, V, GradOut, Lse, Delta, GradQ, cu_seqlens_q, cu_seqlens_k,
    stride_q_t, stride_q_h, stride_q_d,
    stride_k_t, stride_k_h, stride_k_d,
    stride_v_t, stride_v_h, stride_v_d,
    stride_do_t, stride_do_h, stride_do_d,
    stride_dq_t, stride_dq_h, stride_dq_d,
    stride_lse_h, stride_delta_h,
    softmax_scale, softmax_scale_log2, dropout_scale, Seed, drop_threshold,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE_ROWS: tl.constexpr,
):
    """dQ for BLOCK_M query rows of one sequence and one head.

    Grid: (cdiv(max_seqlen_q, BLOCK_M), batch, heads). Tensors and arguments
    as in `attention_backward_dkdv_kernel`; GradQ [Tq, heads, D] any strides.
    The key range walked is the forward kernel's: unmasked full tiles first.
    """
    block_m = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q + seq)
    q_len = tl.load(cu_seqlens_q + seq + 1) - q_start
    m0 = block_m * BLOCK_M
    if m0 >= q_len:
        return
    k_start = tl.load(cu_seqlens_k + seq)
    k_len = tl.load(cu_seqlens_k + seq + 1) - k_start

    offs_m = widen(m0 + tl.arange(0, BLOCK_M), WIDE_ROWS)  # int64 when rows x stride can pass 2**31
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + q_start.to(tl.int64) * stride_q_t + head.to(tl.int64) * stride_q_h
    do_base = GradOut + q_start.to(tl.int64) * stride_do_t + head.to(tl.int64) * stride_do_h
    q = _load_rows(q_base, offs_m, offs_d, q_len, stride_q_t, stride_q_d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(do_base, offs_m, offs_d, q_len, stride_do_t, stride_do_d, HEAD_DIM, BLOCK_D, True)
    # Rows past q_len read lse = delta = 0 and dO = 0, so their ds is 0 even in unmasked tiles.
    lse, delta = _load_row_stats(Lse + head.to(tl.int64) * stride_lse_h + q_start,
                                 Delta + head.to(tl.int64) * stride_delta_h + q_start, offs_m, q_len, True)
    k_base = K + k_start.to(tl.int64) * stride_k_t + head.to(tl.int64) * stride_k_h
    v_base = V + k_start.to(tl.int64) * stride_v_t + head.to(tl.int64) * stride_v_h
    if DROPOUT:
        seed_lo, seed_hi = load_seed_words(Seed)
        prefix = counter_hash_prefix(seed_lo, seed_hi, head + STREAM_DROPOUT)
        row_hash = fmix32(prefix ^ (q_start + offs_m).to(tl.uint32))
    else:
        row_hash = offs_m.to(tl.uint32)  # unused

    diag_offset = k_len - q_len
    if CAUSAL:
        n_end = tl.minimum(k_len, m0 + BLOCK_M + diag_offset)
        n_full = tl.minimum(k_len, m0 + 1 + diag_offset)
    else:
        n_end = k_len
        n_full = k_len
    n_full = (tl.maximum(n_full, 0) // BLOCK_N) * BLOCK_N

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, n_full, BLOCK_N):
        dq = _dq_key_block(
            dq, q, do, lse, delta, k_base, v_base, n0, offs_m, offs_d, k_len, diag_offset,
            k_start, row_hash, drop_threshold, softmax_scale_log2, dropout_scale,
            stride_k_t, stride_k_d, stride_v_t, stride_v_d,
            HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, DROPOUT, DOT_PRECISION, WIDE_ROWS)
    for n0 in range(n_full, n_end, BLOCK_N):
        dq = _dq_key_block(
            dq, q, do, lse, delta, k_base, v_base, n0, offs_m, offs_d, k_len, diag_offset,
            k_start, row_hash, drop_threshold, softmax_scale_log2, dropout_scale,
            stride_k_t, stride_k_d, stride_v_t, stride_v_d,
            HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, DROPOUT, DOT_PRECISION, WIDE_ROWS)

    dq = dq * softmax_scale
    dq_ptrs = (GradQ + q_start.to(tl.int64) * stride_dq_t + head.to(tl.int64) * stride_dq_h
               + offs_m[:, None] * stride_dq_t + offs_d[None, :] * stride_dq_d)
    tl.store(dq_ptrs, dq.to(GradQ.dtype.element_ty),
             mask=(offs_m < q_len)[:, None] & (offs_d < HEAD_DIM)[None, :])
