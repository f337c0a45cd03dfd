"""GEMMs that read their rows through an index: the dense layer of the MLM head.

The MLM head runs only on the masked rows `index` of `hidden_all [N, K]`; these
kernels compute on `hidden_all[index]` by pointer arithmetic on the gathered row ids,
so the gathered [M, K] copy never exists, and scatter the input gradient back.

  gather_linear_gelu      pre = hidden_all[index] @ weight.T + bias, act = gelu_erf(pre)
  gather_linear_weight_grad   d_weight = d_pre.T @ hidden_all[index], d_bias = d_pre.sum(0)
  linear_input_grad_scatter   d_hidden_all[index] += d_pre @ weight (zeros elsewhere)
"""
import torch
import triton
import triton.language as tl

from fastmlm.kernels.triton.cross_entropy import _INTERPRET
from fastmlm.kernels.triton.offsets import unit_column_stride

# tl.constexpr: compiled (not interpreted) kernels may read only constexpr globals.
_SQRT1_2 = tl.constexpr(0.7071067811865476)


def _blocks(device, *, big=64):
    if _INTERPRET or device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)
    return dict(BLOCK_M=big, BLOCK_N=big, BLOCK_K=32, num_warps=4, num_stages=3)


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _gather_linear_gelu_kernel(
        x_ptr, index_ptr, w_ptr, b_ptr, pre_ptr, act_ptr, M, N, K, R,
        stride_xn, stride_xk, stride_wn, stride_wk,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """x [R, K] (strides stride_xn, stride_xk) read at rows index [M]; w [N, K];
    b [N]; pre and act contiguous [M, N] in x's dtype. Grid (M blocks, N blocks).
    An index outside [0, R) (possible only with value checks off) reads nothing and
    makes its row NaN."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    src = tl.load(index_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    src_ok = row_mask & (src >= 0) & (src < R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(x_ptr + src[:, None] * stride_xn + ks[None, :] * stride_xk,
                    mask=src_ok[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wk,
                    mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    pre = acc + tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    pre = tl.where(src_ok[:, None], pre, float("nan"))
    act = 0.5 * pre * (1.0 + tl.math.erf(pre * _SQRT1_2))
    out = rows[:, None].to(tl.int64) * N + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(pre_ptr + out, pre.to(pre_ptr.dtype.element_ty), mask=mask)
    tl.store(act_ptr + out, act.to(act_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gather_linear_weight_grad_kernel(
        dpre_ptr, x_ptr, index_ptr, dw_ptr, db_ptr, M, N, K, R, stride_xn, stride_xk,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """dw fp32 [N, K] = dpre[M, N].T @ x[index], db fp32 [N] = dpre.sum(0) (program
    column 0 writes it). Grid (N blocks, K blocks); each loops over all M: no atomics."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < N
    k_mask = ks < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        src = tl.load(index_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        src_ok = row_mask & (src >= 0) & (src < R)  # a bad row's dpre is NaN already
        dpre = tl.load(dpre_ptr + rows[:, None].to(tl.int64) * N + cols[None, :],
                       mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        x = tl.load(x_ptr + src[:, None] * stride_xn + ks[None, :] * stride_xk,
                    mask=src_ok[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(dpre), x, acc, input_precision=DOT_PRECISION)
        bias_acc += tl.sum(dpre.to(tl.float32), axis=0)
    tl.store(dw_ptr + cols[:, None].to(tl.int64) * K + ks[None, :], acc,
             mask=col_mask[:, None] & k_mask[None, :])
    if tl.program_id(1) == 0:
        tl.store(db_ptr + cols, bias_acc, mask=col_mask)


@triton.jit
def _linear_input_grad_kernel(
        dpre_ptr, w_ptr, index_ptr, out_ptr, M, N, K, R, stride_wn, stride_wk,
        SCATTER_ATOMIC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """d_rows = dpre [M, N] @ w [N, K] (fp32). SCATTER_ATOMIC: atomically added into
    out fp32 [rows, K] at rows index[m]; else stored into out fp32 [M, K] at row m.
    Grid (M blocks, K blocks)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < M
    k_mask = ks < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        dpre = tl.load(dpre_ptr + rows[:, None].to(tl.int64) * N + cols[None, :],
                       mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :] * stride_wk,
                    mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(dpre, w, acc, input_precision=DOT_PRECISION)
    mask = row_mask[:, None] & k_mask[None, :]
    if SCATTER_ATOMIC:
        dest = tl.load(index_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        dest_ok = (dest >= 0) & (dest < R)  # never write outside out's R rows
        # Relaxed: nothing here reads the sums, so no fence around each add.
        tl.atomic_add(out_ptr + dest[:, None] * K + ks[None, :], acc, mask=mask & dest_ok[:, None], sem="relaxed")
    else:
        tl.store(out_ptr + rows[:, None].to(tl.int64) * K + ks[None, :], acc, mask=mask)


@triton.jit
def _segment_scatter_kernel(d_rows_ptr, sorted_index_ptr, order_ptr, out_ptr, M, K, R,
                            BLOCK_K: tl.constexpr):
    """Deterministic scatter-add. sorted_index [M] is index sorted (stable), order [M]
    the permutation; the program at the first position of each run of equal indices
    sums d_rows fp32 [M, K] over the run in order and stores row `index` of out [rows, K]
    (zeroed; other programs do nothing). Grid (M, K blocks)."""
    pos = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = ks < K
    dest = tl.load(sorted_index_ptr + pos).to(tl.int64)
    prev = tl.load(sorted_index_ptr + pos - 1, mask=pos > 0, other=-1).to(tl.int64)
    if prev != dest:
        acc = tl.zeros((BLOCK_K,), tl.float32)
        j = pos
        current = dest
        while current == dest:
            src = tl.load(order_ptr + j).to(tl.int64)
            acc += tl.load(d_rows_ptr + src * K + ks, mask=k_mask, other=0.0)
            j += 1
            # Past the end reads dest + 1, which closes the last run whatever dest is.
            current = tl.load(sorted_index_ptr + j, mask=j < M, other=dest + 1).to(tl.int64)
        dest_ok = (dest >= 0) & (dest < R)  # never write outside out's R rows
        tl.store(out_ptr + dest * K + ks, acc.to(out_ptr.dtype.element_ty), mask=k_mask & dest_ok)


def gather_linear_gelu(hidden_all, index, weight, bias):
    """(pre, act) [M, N] in hidden_all's dtype: pre = hidden_all[index] @ weight.T + bias."""
    M, N, K = index.shape[0], weight.shape[0], weight.shape[1]
    index, bias = index.contiguous(), bias.contiguous()  # the kernel reads vectors with unit stride
    hidden_all, weight = unit_column_stride(hidden_all), unit_column_stride(weight)
    pre = torch.full((M, N), float("nan"), dtype=hidden_all.dtype, device=hidden_all.device)
    act = torch.full_like(pre, float("nan"))
    if M == 0:
        return pre, act
    cfg = _blocks(hidden_all.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _gather_linear_gelu_kernel[grid](
        hidden_all, index, weight, bias, pre, act, M, N, K, hidden_all.shape[0],
        hidden_all.stride(0), hidden_all.stride(1), weight.stride(0), weight.stride(1),
        DOT_PRECISION=_precision(hidden_all.dtype), **cfg)
    return pre, act


def gather_linear_weight_grad(d_pre, hidden_all, index):
    """(d_weight [N, K], d_bias [N]) in hidden_all's dtype; d_pre contiguous [M, N]."""
    M, N = d_pre.shape
    index = index.contiguous()  # read with unit stride
    hidden_all = unit_column_stride(hidden_all)
    K = hidden_all.shape[1]
    device = hidden_all.device
    d_weight = torch.full((N, K), float("nan"), dtype=torch.float32, device=device)
    d_bias = torch.full((N,), float("nan"), dtype=torch.float32, device=device)
    if M == 0:
        return d_weight.zero_().to(hidden_all.dtype), d_bias.zero_().to(hidden_all.dtype)
    cfg = _blocks(device)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(K, cfg["BLOCK_K"]))
    _gather_linear_weight_grad_kernel[grid](
        d_pre, hidden_all, index, d_weight, d_bias, M, N, K, hidden_all.shape[0],
        hidden_all.stride(0), hidden_all.stride(1),
        DOT_PRECISION=_precision(hidden_all.dtype), **cfg)
    return d_weight.to(hidden_all.dtype), d_bias.to(hidden_all.dtype)


def linear_input_grad_scatter(d_pre, weight, index, num_rows, *, deterministic):
    """d_hidden_all [num_rows, K]: zeros, plus (d_pre @ weight)[m] added at row index[m].
    Default: fp32 atomics straight into the rows. Deterministic: rows written in
    place, then summed per index in sorted order (no atomics, any duplicates)."""
    M, N = d_pre.shape
    K = weight.shape[1]
    device, dtype = weight.device, weight.dtype
    index = index.contiguous()  # read with unit stride
    weight = unit_column_stride(weight)
    if M == 0:
        return torch.zeros((num_rows, K), dtype=dtype, device=device)
    cfg = _blocks(device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(K, cfg["BLOCK_K"]))
    opts = dict(DOT_PRECISION=_precision(dtype), **cfg)
    if not deterministic:
        out = torch.zeros((num_rows, K), dtype=torch.float32, device=device)
        _linear_input_grad_kernel[grid](d_pre, weight, index, out, M, N, K, num_rows,
                                        weight.stride(0), weight.stride(1),
                                        SCATTER_ATOMIC=True, **opts)
        return out.to(dtype)
    d_rows = torch.full((M, K), float("nan"), dtype=torch.float32, device=device)
    _linear_input_grad_kernel[grid](d_pre, weight, index, d_rows, M, N, K, num_rows,
                                    weight.stride(0), weight.stride(1),
                                    SCATTER_ATOMIC=False, **opts)
    sorted_index, order = torch.sort(index, stable=True)
    out = torch.zeros((num_rows, K), dtype=dtype, device=device)
    block_k = 64 if _INTERPRET else 256
    _segment_scatter_kernel[(M, triton.cdiv(K, block_k))](
        d_rows, sorted_index, order, out, M, K, num_rows, BLOCK_K=block_k)
    return out
