"""Reference for `attention` on packed variable-length sequences.

The packed rows are scattered into a padded `[batch, max_len, heads, dim]`
view without reading sequence lengths on the host (every index is computed on
the device from `cu_seqlens`), attention is computed densely with a
visibility mask, and the result is gathered back to packed rows.
"""
from __future__ import annotations

import torch

from fastmlm.reference.random import STREAM_DROPOUT, counter_hash, threshold24


def padded_rows(cu_seqlens: torch.Tensor, max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed row of (sequence b, position i), clamped to 0 where i is past the end; and validity."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    pos = torch.arange(max_seqlen, device=cu_seqlens.device)
    valid = pos.view(1, -1) < lengths.view(-1, 1)
    rows = cu_seqlens[:-1].to(torch.int64).view(-1, 1) + pos.view(1, -1)
    return torch.where(valid, rows, 0), valid


def packed_coordinates(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, position) of every packed row: the inverse of `padded_rows`."""
    rows = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].to(torch.int64), rows, right=True)
    return seq, rows - cu_seqlens.to(torch.int64)[seq]


def visibility(cu_q, cu_k, max_q, max_k, causal, *, valid_q=None, valid_k=None):
    """[batch, 1, max_q, max_k] bool: may query i see key j of the same sequence.

    valid_q / valid_k: `padded_rows(cu_q, max_q)[1]` / `padded_rows(cu_k, max_k)[1]`
    when the caller has them already.
    """
    if valid_q is None:
        _, valid_q = padded_rows(cu_q, max_q)
    if valid_k is None:
        _, valid_k = padded_rows(cu_k, max_k)
    visible = valid_q.view(-1, 1, max_q, 1) & valid_k.view(-1, 1, 1, max_k)
    if causal:
        # Ends aligned: query i of Lq sees key j of Lk when j <= i + Lk - Lq.
        shift = ((cu_k[1:] - cu_k[:-1]) - (cu_q[1:] - cu_q[:-1])).to(torch.int64)
        i = torch.arange(max_q, device=cu_q.device).view(1, 1, -1, 1)
        j = torch.arange(max_k, device=cu_q.device).view(1, 1, 1, -1)
        visible &= j <= i + shift.view(-1, 1, 1, 1)
    return visible


def attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
                      causal: bool, softmax_scale: float, dropout_p: float, seed: int | torch.Tensor):
    """(out [Tq, heads, D] in q's dtype, lse [heads, Tq] fp32 or fp64).

    `seed` is an int or a 0-d int64 tensor; a tensor is hashed on the device, never read on the host.
    """
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    total_q, heads, _ = q.shape
    rows_q, _ = padded_rows(cu_seqlens_q, max_seqlen_q)
    rows_k, _ = padded_rows(cu_seqlens_k, max_seqlen_k)
    if total_q == 0 or k.shape[0] == 0:
        return torch.zeros_like(q), torch.full((heads, total_q), float("-inf"), dtype=dtype, device=q.device)
    qp, kp, vp = (t.to(dtype)[r] for t, r in ((q, rows_q), (k, rows_k), (v, rows_k)))  # [B, L, H, D]
    scores = torch.einsum("bihd,bjhd->bhij", qp, kp) * softmax_scale
    visible = visibility(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf where nothing is visible
    finite_lse = torch.where(torch.isinf(lse), 0.0, lse)
    probs = torch.where(visible, torch.exp(scores - finite_lse.unsqueeze(-1)), 0.0)
    if dropout_p > 0.0:
        head = torch.arange(heads, device=q.device).view(1, -1, 1, 1)
        h = counter_hash(seed, STREAM_DROPOUT + head, rows_q.view(-1, 1, max_seqlen_q, 1), rows_k.view(-1, 1, 1, max_seqlen_k))
        keep = (h >> 8) >= threshold24(dropout_p)
        probs = torch.where(keep, probs / (1.0 - dropout_p), 0.0)
    out = torch.einsum("bhij,bjhd->bihd", probs, vp)
    seq, pos = packed_coordinates(cu_seqlens_q, total_q)
    out_packed = out[seq, pos].to(q.dtype)
    lse_packed = lse[seq, :, pos].T.contiguous()
    return out_packed, lse_packed
