"""fastmlm._C's CPU masking kernels (mask_tokens, masked_positions) against the
PyTorch reference, bit for bit; plus the shared hash (csrc/common/hash.h)
against the docs/ops.md test vectors. CUDA versions: tests/gpu/test_cuda_kernels.py.
"""
import math

import pytest
import torch

from fastmlm import _ext
from fastmlm.reference import masking as reference
from fastmlm.reference.random import counter_hash

if _ext.load_error() is not None:
    pytest.skip(f"fastmlm._C unavailable: {_ext.load_error()}", allow_module_level=True)

from fastmlm.kernels.compiled import masking  # noqa: E402

from tests.tolerances import assert_equal  # noqa: E402

C = _ext.module()
MASK_ID = 103
VOCAB = 30522


def test_hash_vectors_from_docs():
    assert [C.hash_u32(0, 0, a, 0) for a in range(4)] == [1351578270, 3871376586, 2659491925, 4242526263]
    assert C.hash_u32(2**64 - 1, 5, 2**32 - 1, 7) == 2033577350


def test_hash_matches_reference_on_random_counters():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 2**32, (64,), generator=g, dtype=torch.int64)
    b = torch.randint(0, 2**32, (64,), generator=g, dtype=torch.int64)
    for seed, stream in ((0, 0), (123456789, 1), (2**63 + 12345, 2), (2**40 + 7, 0x100 + 11)):
        expected = counter_hash(seed, stream, a, b).tolist()
        assert [C.hash_u32(seed, stream, int(x), int(y)) for x, y in zip(a, b)] == expected


def _inputs(batch, length, dtype, seed, with_masks=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g).to(dtype)
    if not with_masks:
        return ids, None, None
    special = torch.zeros(batch, length, dtype=torch.int64)
    special[:, 0] = 1
    special[:, -1] = 1
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    attention = (torch.arange(length).view(1, -1) < lengths.view(-1, 1)).to(torch.int64)
    return ids, special, attention


def _check(ids, special, attention, p, seed, exact):
    kwargs = dict(mask_token_id=MASK_ID, vocab_size=VOCAB, mlm_probability=p, seed=seed, exact=exact)
    got_ids, got_labels = masking.mask_tokens(ids, special, attention, **kwargs)
    want_ids, want_labels = reference.mask_tokens(ids, special, attention, **kwargs)
    assert_equal(got_ids, want_ids, "masked_ids")
    assert_equal(got_labels, want_labels, "labels")
    return got_ids, got_labels


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (5, 300), (64, 128)])
def test_mask_tokens_matches_reference(shape, dtype, exact):
    ids, special, attention = _inputs(*shape, dtype, seed=shape[1])
    _check(ids, special, attention, 0.15, seed=2**62 + shape[0], exact=exact)
    _check(ids, None, None, 0.4, seed=7, exact=exact)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("p", [0.0, 1.0])
def test_mask_tokens_extreme_probabilities(p, exact):
    ids, special, attention = _inputs(4, 50, torch.int64, seed=3)
    _, labels = _check(ids, special, attention, p, seed=11, exact=exact)
    eligible = (special == 0) & (attention != 0)
    assert torch.equal(labels != -100, eligible if p == 1.0 else torch.zeros_like(eligible))


@pytest.mark.parametrize("exact", [False, True])
def test_mask_tokens_large_parallel_path(exact):
    ids, special, attention = _inputs(64, 4096, torch.int64, seed=6)  # past the OpenMP threshold (2**18 tokens)
    _check(ids, special, attention, 0.15, seed=8, exact=exact)


def test_mask_tokens_exact_budget_counts():
    ids, special, attention = _inputs(32, 200, torch.int64, seed=5)
    for p in (0.15, 0.5, 0.99):
        _, labels = _check(ids, special, attention, p, seed=99, exact=True)
        n_eligible = ((special == 0) & (attention != 0)).sum(1).tolist()
        counts = (labels != -100).sum(1).tolist()
        assert counts == [math.floor(n * p + 0.5) for n in n_eligible]


def test_mask_tokens_mask_dtypes_and_strides():
    ids, special, attention = _inputs(6, 40, torch.int32, seed=8)
    # Transposed (column-major) ids and masks, bool / uint8 / float masks.
    ids_t = ids.t().contiguous().t()
    assert not ids_t.is_contiguous()
    _check(ids_t, special.bool().t().contiguous().t(), attention.to(torch.uint8), 0.3, seed=1, exact=True)
    _check(ids[:, ::2], special[:, ::2].to(torch.int32), attention[:, ::2].float(), 0.3, seed=1, exact=False)
    # A broadcast attention mask (stride 0 rows).
    row_mask = attention[:1].expand(6, 40)
    _check(ids, None, row_mask, 0.5, seed=2, exact=True)


def test_mask_tokens_all_ineligible_and_empty():
    ids, _, _ = _inputs(3, 20, torch.int64, seed=4, with_masks=False)
    _, labels = _check(ids, torch.ones_like(ids), None, 0.5, seed=1, exact=True)
    assert (labels == -100).all()
    masked, labels = masking.mask_tokens(ids[:0], None, None, mask_token_id=MASK_ID, vocab_size=VOCAB,
                                         mlm_probability=0.15, seed=0, exact=True)
    assert masked.shape == (0, 20) and labels.shape == (0, 20)


def test_mask_tokens_rejects_bad_input():
    ids = torch.zeros(2, 3, dtype=torch.int64)
    kwargs = dict(mask_token_id=MASK_ID, vocab_size=VOCAB, mlm_probability=0.15, seed=0, exact=False)
    with pytest.raises(TypeError, match="int32 or int64"):
        masking.mask_tokens(ids.float(), None, None, **kwargs)
    with pytest.raises(ValueError, match="batch, length"):
        masking.mask_tokens(ids.view(-1), None, None, **kwargs)
    with pytest.raises(ValueError, match="attention_mask"):
        masking.mask_tokens(ids, None, torch.ones(3, 2), **kwargs)


def _labels(shape, keep_fraction, dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, shape, generator=g).to(dtype)
    return torch.where(torch.rand(shape, generator=g) < keep_fraction, labels, torch.full_like(labels, -100))


@pytest.mark.parametrize("capacity", [None, 0, 1, 37, 5000])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_masked_positions_matches_reference(capacity, dtype):
    labels = _labels((8, 129), 0.15, dtype, seed=capacity or 3)
    got = masking.masked_positions(labels, ignore_index=-100, capacity=capacity)
    want = reference.masked_positions(labels, ignore_index=-100, capacity=capacity)
    assert_equal(got[0], want[0], "index")
    assert_equal(got[1], want[1], "count")


@pytest.mark.parametrize("keep_fraction", [0.0, 0.15, 1.0])
def test_masked_positions_large_parallel_path(keep_fraction):
    labels = _labels((64, 16384), keep_fraction, seed=1)  # past the OpenMP threshold (2**20 labels)
    capacity = 200000
    got = masking.masked_positions(labels, ignore_index=-100, capacity=capacity)
    want = reference.masked_positions(labels, ignore_index=-100, capacity=capacity)
    assert_equal(got[0], want[0], "index")
    assert_equal(got[1], want[1], "count")
    index, count = masking.masked_positions(labels, ignore_index=-100, capacity=None)
    assert index.shape == (int(count),)
    assert torch.equal(index, torch.nonzero(labels.view(-1) != -100).view(-1))


def test_masked_positions_shapes_and_ignore_index():
    labels = _labels((2, 3, 50), 0.3, seed=2)
    for t in (labels, labels.transpose(1, 2), labels.view(-1)[:0]):
        for ignore in (-100, 7):
            got = masking.masked_positions(t, ignore_index=ignore, capacity=None)
            want = reference.masked_positions(t, ignore_index=ignore, capacity=None)
            assert_equal(got[0], want[0], "index")
            assert_equal(got[1], want[1], "count")
    with pytest.raises(TypeError, match="integer"):
        masking.masked_positions(labels.float(), ignore_index=-100, capacity=None)


def test_available():
    assert masking.available("cpu") is None
    assert "meta" in masking.available("meta")
    if not _ext.has_cuda_kernels():
        assert "without CUDA" in masking.available("cuda")
