"""The `sdpa` attention backend: PyTorch's fused CPU flash-attention kernel on a padded view.

Packed rows are scattered into `[batch, heads, max_len, dim]` with indices
computed on the device (no host synchronisation), the variable lengths and the
causal rule become an additive mask, and the kernel returns the log-sum-exp
that fastmlm's attention contract needs, so its backward can be PyTorch's
fused backward too.
"""
from __future__ import annotations

import torch

from fastmlm.reference.attention import packed_coordinates, padded_rows, visibility

_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _layout(cu_q, cu_k, max_q, max_k, causal, total_q):
    # Built in every layer's forward and backward: each index tensor once (self-attention
    # has the same sequences for queries and keys).
    rows_q, valid_q = padded_rows(cu_q, max_q)
    rows_k, valid_k = (rows_q, valid_q) if cu_k is cu_q and max_k == max_q else padded_rows(cu_k, max_k)
    visible = visibility(cu_q, cu_k, max_q, max_k, causal, valid_q=valid_q, valid_k=valid_k)
    # A query that sees no key (padding, or causal with fewer keys) would make
    # the kernel divide by zero: let it see everything, then zero its output.
    sees_any = visible.any(dim=-1, keepdim=True)
    mask = torch.where(visible | ~sees_any, 0.0, float("-inf"))
    seq, pos = packed_coordinates(cu_q, total_q)
    return rows_q, rows_k, mask, sees_any, seq, pos


def _padded(t, rows):
    # The CPU flash kernel assumes unit stride along D without checking (a [T, H, D]
    # view of [T, D, H] storage gives garbage), and t[rows] keeps t's stride order.
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t[rows].permute(0, 2, 1, 3)  # [B, H, L, D]


def attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, *, causal, softmax_scale):
    total_q, heads, _ = q.shape
    if total_q == 0 or k.shape[0] == 0:
        return torch.zeros_like(q), torch.full((heads, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    rows_q, rows_k, mask, sees_any, seq, pos = _layout(cu_q, cu_k, max_q, max_k, causal, total_q)
    out, lse = _forward(_padded(q, rows_q), _padded(k, rows_k), _padded(v, rows_k),
                        attn_mask=mask.to(q.dtype), scale=softmax_scale)
    out = out * sees_any.to(out.dtype)
    lse = torch.where(sees_any.squeeze(-1), lse, float("-inf"))
    return out[seq, :, pos].contiguous(), lse[seq, :, pos].T.float().contiguous()


def attention_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, *, causal, softmax_scale):
    total_q, heads, _ = q.shape
    if total_q == 0 or k.shape[0] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    rows_q, rows_k, mask, sees_any, seq, pos = _layout(cu_q, cu_k, max_q, max_k, causal, total_q)
    # Re-pad out, grad_out and lse. Padding rows and queries that see no key get
    # zero gradient and lse +inf: their softmax weights exp(s - lse) are then 0
    # for every finite score s, so they contribute exactly 0 (lse 0 overflowed to
    # inf * 0 = NaN once a score exceeded ~88, and padding slots alias row 0).
    lse_padded = torch.full((rows_q.shape[0], heads, rows_q.shape[1]), float("inf"), dtype=torch.float32,
                            device=q.device)
    lse_padded[seq, :, pos] = torch.where(torch.isinf(lse), float("inf"), lse).T
    grad_padded = torch.zeros(rows_q.shape[0], rows_q.shape[1], heads, q.shape[2], dtype=q.dtype, device=q.device)
    grad_padded[seq, pos] = grad_out.to(q.dtype)
    out_padded = torch.zeros_like(grad_padded)
    out_padded[seq, pos] = out
    grad_padded = grad_padded * sees_any.permute(0, 2, 1, 3).to(q.dtype)
    dq, dk, dv = _backward(grad_padded.permute(0, 2, 1, 3), _padded(q, rows_q), _padded(k, rows_k), _padded(v, rows_k),
                           out_padded.permute(0, 2, 1, 3), lse_padded, 0.0, False, attn_mask=mask.to(q.dtype),
                           scale=softmax_scale)
    dq = dq.permute(0, 2, 1, 3)[seq, pos]
    # Keys: sum the padded gradient back into packed rows (padding slots point
    # at row 0 and carry exactly zero gradient, so index_add is safe).
    dk_packed = torch.zeros_like(k, dtype=torch.float32).index_add_(0, rows_k.reshape(-1), dk.permute(0, 2, 1, 3).reshape(-1, *k.shape[1:]).float())
    dv_packed = torch.zeros_like(v, dtype=torch.float32).index_add_(0, rows_k.reshape(-1), dv.permute(0, 2, 1, 3).reshape(-1, *v.shape[1:]).float())
    return dq.to(q.dtype), dk_packed.to(k.dtype), dv_packed.to(v.dtype)
