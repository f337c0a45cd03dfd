"""fastmlm's ops inside torch.autocast regions (CPU, bf16).

Each op's autocast rule casts its floating inputs to the region's dtype, so inside
a region fp32 weights beside a bf16 activation are accepted (as torch's own ops
accept them) and the result equals the op on inputs cast by hand.
"""
import torch

from fastmlm.ops import attention, mlm_cross_entropy, mlm_head

BF16 = torch.bfloat16


def _leaves(*tensors):
    return [t.clone().requires_grad_() for t in tensors]


def test_cross_entropy_takes_mixed_dtypes_in_a_region():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 16, generator=g).to(BF16)  # as a bf16 layer would hand it over
    weight, bias = torch.randn(40, 16, generator=g), torch.randn(40, generator=g)
    targets = torch.tensor([1, 5, -100, 39, 0, 7])
    w, b = _leaves(weight, bias)
    with torch.autocast("cpu", dtype=BF16):
        loss = mlm_cross_entropy(hidden, w, targets, b)
    loss.backward()
    w16, b16 = _leaves(weight.to(BF16), bias.to(BF16))
    expected = mlm_cross_entropy(hidden, w16, targets, b16)
    expected.backward()
    assert torch.equal(loss, expected)
    assert w.grad.dtype == torch.float32 and torch.equal(w.grad, w16.grad.float())
    assert torch.equal(b.grad, b16.grad.float())


def test_mlm_head_takes_mixed_dtypes_in_a_region():
    g = torch.Generator().manual_seed(1)
    hidden_all = torch.randn(9, 16, generator=g).to(BF16)
    params = [torch.randn(16, 16, generator=g) * 0.25, torch.randn(16, generator=g), torch.ones(16),
              torch.zeros(16), torch.randn(40, 16, generator=g) * 0.25, torch.zeros(40)]
    index, targets = torch.tensor([0, 4, 4, 8]), torch.tensor([3, -100, 39, 0])
    leaves = _leaves(*params)
    with torch.autocast("cpu", dtype=BF16):
        loss = mlm_head(hidden_all, index, *leaves, targets)
    loss.backward()
    leaves16 = _leaves(*(p.to(BF16) for p in params))
    expected = mlm_head(hidden_all, index, *leaves16, targets)
    expected.backward()
    assert torch.equal(loss, expected)
    for p, p16 in zip(leaves, leaves16):
        assert p.grad.dtype == torch.float32 and torch.equal(p.grad, p16.grad.float())


def test_attention_runs_in_the_region_dtype():
    q, k, v = (torch.randn(7, 2, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    with torch.autocast("cpu", dtype=BF16):
        out = attention(q, k, v, cu, 4)
    assert out.dtype == BF16
    assert torch.equal(out, attention(q.to(BF16), k.to(BF16), v.to(BF16), cu, 4))


def test_float64_inputs_are_left_alone_as_by_torch():
    # Autocast casts fp32/fp16 inputs, never float64 ones (F.linear in a region stays fp64).
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(5, 16, generator=g, dtype=torch.float64), torch.randn(30, 16, generator=g,
                                                                                     dtype=torch.float64)
    targets = torch.tensor([1, 29, -100, 0, 7])
    with torch.autocast("cpu", dtype=BF16):
        assert torch.nn.functional.linear(hidden, weight).dtype == torch.float64
        loss, lse = mlm_cross_entropy(hidden, weight, targets, return_lse=True)
    assert lse.dtype == torch.float64
    assert torch.equal(loss, mlm_cross_entropy(hidden, weight, targets))
