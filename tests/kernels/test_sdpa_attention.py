"""The `sdpa` attention backend (fastmlm/kernels/sdpa.py) where its padded view can go wrong.

The harness (tests/ops/cases/attention.py) compares it with the reference on ordinary
inputs; these are the cases a relative-error harness cannot judge: scores far past
exp's fp32 range, where the gradients are tiny and ill-conditioned but must be finite.
"""
from __future__ import annotations

import pytest
import torch

from fastmlm.ops import use_backend
from fastmlm.ops.attention import attention


def _grads(backend, dtype, q, k, v, upstream, **kwargs):
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    with use_backend(backend, "attention"):
        out = attention(*leaves, **kwargs)
        grads = torch.autograd.grad((out.double() * upstream).sum(), leaves)
    return [out.double(), *(g.double() for g in grads)]


@pytest.mark.parametrize("layout", ["padded", "no-key-causal"])
def test_backward_stays_finite_past_exp_range(layout):
    # q = k = 3 x randn: a token's score with itself is ~9 * 16 = 144, past exp's fp32
    # range. Padding slots (which alias packed row 0) and queries that see no key must
    # contribute exactly 0 to the gradients: with lse 0 in the backward their softmax
    # weights overflowed to inf and inf * 0 made NaN.
    g = torch.Generator().manual_seed(5)
    if layout == "padded":
        cu_q = cu_k = torch.tensor([0, 2, 9], dtype=torch.int32)
        kwargs = dict(cu_seqlens=cu_q, max_seqlen=7)
    else:  # 4 queries against 2 keys, causal: the first two queries see none
        cu_q, cu_k = torch.tensor([0, 4, 7], dtype=torch.int32), torch.tensor([0, 2, 5], dtype=torch.int32)
        kwargs = dict(cu_seqlens=cu_q, max_seqlen=4, cu_seqlens_k=cu_k, max_seqlen_k=3, causal=True)
    q = 3 * torch.randn(int(cu_q[-1]), 2, 16, generator=g, dtype=torch.float64)
    k = q[: int(cu_k[-1])].clone()
    v = torch.randn(int(cu_k[-1]), 2, 16, generator=g, dtype=torch.float64)
    upstream = torch.randn(q.shape, generator=g, dtype=torch.float64)
    got = _grads("sdpa", torch.float32, q, k, v, upstream, softmax_scale=1.0, **kwargs)
    expected = _grads("torch", torch.float64, q, k, v, upstream, softmax_scale=1.0, **kwargs)
    for name, a, e in zip(["out", "dq", "dk", "dv"], got, expected):
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        # Absolute: near-one-hot softmax leaves dq/dk as differences of nearly equal terms.
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * max(e.abs().max().item(), 1.0), msg=name)
