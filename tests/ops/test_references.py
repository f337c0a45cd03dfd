"""The references against independent formulations, so the specification itself is checked."""
import pytest
import torch
import torch.nn.functional as F

from fastmlm.reference import attention as attention_ref
from fastmlm.reference import cross_entropy as ce_ref
from fastmlm.reference import masking as masking_ref
from fastmlm.reference.random import counter_hash, threshold24

MASK32 = 0xFFFFFFFF


def _fmix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & MASK32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & MASK32
    return x ^ (x >> 16)


def _hash(seed: int, stream: int, a: int, b: int) -> int:
    """Python-int statement of the hash in docs/ops.md."""
    seed %= 1 << 64
    h = _fmix32((seed & MASK32) ^ 0x6A09E667 ^ ((stream * 0x9E3779B9) & MASK32))
    h = _fmix32(h ^ (seed >> 32))
    h = _fmix32(h ^ a)
    return _fmix32(h ^ b)


def test_hash_vectors_from_the_contract():
    got = counter_hash(0, 0, torch.arange(4), torch.zeros(4, dtype=torch.int64)).tolist()
    assert got == [1351578270, 3871376586, 2659491925, 4242526263]
    assert counter_hash(2**64 - 1, 5, torch.tensor([2**32 - 1]), torch.tensor([7])).item() == 2033577350


def test_hash_matches_python_ints():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 2**32, (200,), generator=g, dtype=torch.int64)
    b = torch.randint(0, 2**32, (200,), generator=g, dtype=torch.int64)
    for seed in (0, 12345, -1, 2**63 + 17):
        got = counter_hash(seed, 7, a, b).tolist()
        assert got == [_hash(seed, 7, x, y) for x, y in zip(a.tolist(), b.tolist())]


def test_mask_tokens_reference_matches_a_loop():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 50, (3, 16), generator=g)
    special = torch.zeros_like(ids)
    special[:, 0] = 1
    attention = torch.ones_like(ids)
    attention[1, 10:] = 0
    seed, p, vocab, mask_id = 99, 0.4, 50, 4
    for exact in (False, True):
        masked, labels = masking_ref.mask_tokens(ids, special, attention, mask_token_id=mask_id, vocab_size=vocab,
                                                 mlm_probability=p, seed=seed, exact=exact)
        for r in range(3):
            eligible = [j for j in range(16) if special[r, j] == 0 and attention[r, j] == 1]
            if exact:
                k = masking_ref.expected_mask_count(len(eligible), p)
                chosen = set(sorted(eligible, key=lambda j: (_hash(seed, 0, r, j), j))[:k])
            else:
                chosen = {j for j in eligible if (_hash(seed, 0, r, j) >> 8) < threshold24(p)}
            for j in range(16):
                original = ids[r, j].item()
                if j not in chosen:
                    assert labels[r, j] == -100 and masked[r, j] == original
                    continue
                assert labels[r, j] == original
                u = _hash(seed, 1, r, j) >> 8
                if u < threshold24(0.8):
                    assert masked[r, j] == mask_id
                elif u < threshold24(0.9):
                    assert masked[r, j] == (_hash(seed, 2, r, j) * vocab) >> 32
                else:
                    assert masked[r, j] == original


@pytest.mark.parametrize("capacity", [None, 3, 100])
def test_masked_positions_reference_matches_nonzero(capacity):
    g = torch.Generator().manual_seed(3)
    labels = torch.where(torch.rand(4, 25, generator=g) < 0.2, 7, -100)
    index, count = masking_ref.masked_positions(labels, ignore_index=-100, capacity=capacity)
    expected = torch.nonzero(labels.view(-1) != -100).view(-1)
    assert count.item() == expected.numel()
    if capacity is None:
        assert torch.equal(index, expected)
    else:
        n = min(capacity, expected.numel())
        assert index.shape == (capacity,)
        assert torch.equal(index[:n], expected[:n]) and not index[n:].any()


@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)])
def test_cross_entropy_reference_matches_autograd_of_f_cross_entropy(label_smoothing, z_loss):
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(9, 12, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(31, 12, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(31, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 31, (9,), generator=g)
    targets[[1, 5]] = -100
    logits = hidden @ weight.T + bias
    rows = F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)
    rows = rows + z_loss * torch.logsumexp(logits, -1) ** 2 * (targets != -100)
    upstream = torch.randn(9, generator=g, dtype=torch.float64)
    expected = torch.autograd.grad((rows * upstream).sum(), (hidden, weight, bias))
    row_loss, lse = ce_ref.cross_entropy_forward(hidden, weight, bias, targets, ignore_index=-100,
                                                 label_smoothing=label_smoothing, z_loss=z_loss)
    torch.testing.assert_close(row_loss, rows)
    got = ce_ref.cross_entropy_backward(upstream, hidden, weight, bias, targets, lse, ignore_index=-100,
                                        label_smoothing=label_smoothing, z_loss=z_loss)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)


def _per_sequence_sdpa(q, k, v, cu_q, cu_k, causal):
    outs = []
    for b in range(len(cu_q) - 1):
        qs, ks, vs = (t[lo:hi].transpose(0, 1) for t, lo, hi in
                      ((q, cu_q[b], cu_q[b + 1]), (k, cu_k[b], cu_k[b + 1]), (v, cu_k[b], cu_k[b + 1])))
        if qs.shape[1] == 0:
            continue
        mask = None
        if causal:
            lq, lk = qs.shape[1], ks.shape[1]
            mask = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask) if ks.shape[1] else torch.zeros_like(qs)
        outs.append(torch.nan_to_num(out).transpose(0, 1))  # a query that sees no key: 0
    return torch.cat(outs)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_lengths,k_lengths", [([3, 1, 6], [3, 1, 6]), ([2, 4], [5, 4]), ([4, 2], [2, 2])])
def test_attention_reference_matches_sdpa_per_sequence(causal, q_lengths, k_lengths):
    g = torch.Generator().manual_seed(5)
    cu_q = torch.tensor([0, *torch.tensor(q_lengths).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(k_lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(int(cu_k[-1]), 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(int(cu_k[-1]), 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    out, lse = attention_ref.attention_forward(q, k, v, cu_q, cu_k, max(q_lengths), max(k_lengths), causal=causal,
                                               softmax_scale=8**-0.5, dropout_p=0.0, seed=0)
    expected = _per_sequence_sdpa(q, k, v, cu_q.tolist(), cu_k.tolist(), causal)
    torch.testing.assert_close(out, expected)
    upstream = torch.randn_like(out)
    got = torch.autograd.grad((out * upstream).sum(), (q, k, v))
    want = torch.autograd.grad((expected * upstream).sum(), (q, k, v))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    assert lse.shape == (2, q.shape[0])


def test_attention_reference_dropout_rate_and_scaling():
    # With v = 1 everywhere each output entry is the sum of kept weights over
    # (1 - p): its mean over many queries is 1 and the dropped share is p.
    cu = torch.tensor([0, 400], dtype=torch.int32)
    q = torch.zeros(400, 1, 8, dtype=torch.float64)
    k = torch.zeros(400, 1, 8, dtype=torch.float64)
    v = torch.ones(400, 1, 8, dtype=torch.float64)
    p = 0.25
    out, _ = attention_ref.attention_forward(q, k, v, cu, cu, 400, 400, causal=False, softmax_scale=1.0,
                                             dropout_p=p, seed=11)
    kept_share = out[:, 0, 0] * (1 - p)  # per query: kept keys / 400
    assert abs(kept_share.mean().item() - (1 - p)) < 0.01
    # Another seed drops other weights.
    out2, _ = attention_ref.attention_forward(q, k, v, cu, cu, 400, 400, causal=False, softmax_scale=1.0,
                                              dropout_p=p, seed=12)
    assert not torch.equal(out, out2)
