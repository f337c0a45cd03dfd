"""Every CUDA entry point of fastmlm._C against the PyTorch reference (and the
CPU kernels, which must agree bit for bit where the op is exact).

Runs whenever a CUDA GPU is visible and fastmlm._C has its CUDA kernels;
skips otherwise. Run: python -m pytest -q tests/gpu/test_cuda_kernels.py
"""
import math

import pytest
import torch

from fastmlm import _ext

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU visible to torch", allow_module_level=True)
if not _ext.has_cuda_kernels():
    pytest.skip(f"fastmlm._C has no CUDA kernels: {_ext.unavailable_reason('cuda')}", allow_module_level=True)

from fastmlm.kernels.compiled import gather, masking  # noqa: E402
from fastmlm.reference import gather as gather_reference  # noqa: E402
from fastmlm.reference import masking as masking_reference  # noqa: E402

from tests.tolerances import assert_close, assert_equal  # noqa: E402

C = _ext.module()
DEV = torch.device("cuda")
MASK_ID, VOCAB = 103, 30522
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def test_module_sees_the_gpu():
    assert C.with_cuda
    assert C.cuda_device_count() == torch.cuda.device_count()


def test_kernels_are_offered_for_this_gpu():
    assert _ext.unavailable_reason("cuda", DEV) is None, _ext.cuda_architectures()


def test_kernel_code_loads_on_this_gpu():
    binary, ptx = _ext.kernel_image(DEV.index or 0)
    capability = torch.cuda.get_device_capability(DEV)
    # The loaded machine code is for this GPU's architecture family, made from PTX no newer than it.
    assert _ext.architecture_runs(f"{binary}-real", capability), (binary, capability)
    assert 0 < ptx <= binary, (binary, ptx)
    assert _ext._kernel_image_reason(DEV.index or 0) is None
    from fastmlm.info import report

    assert f"CUDA kernels on this GPU: load as sm_{binary} machine code" in report()


def test_a_gpu_the_build_cannot_run_falls_back_to_torch(monkeypatch):
    from fastmlm.ops import gather_rows
    from fastmlm.ops.gather import GATHER_ROWS

    x = torch.randn(16, 8, device=DEV)
    index = torch.tensor([3, 0, 15], device=DEV)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert GATHER_ROWS.choose("cuda", x, index).name == "torch"
    torch.testing.assert_close(gather_rows(x, index), x[index])


def test_cuda_errors_become_runtime_errors():
    x = torch.randn(4, 8, device=DEV)
    index = torch.zeros(2, dtype=torch.int64, device=DEV)
    out = torch.empty(2, 8, device=DEV)
    with pytest.raises(RuntimeError, match="CUDA error"):
        C.gather_rows(x=x.data_ptr(), x_row_stride=8, dtype=0, index=index.data_ptr(), index_dtype=4,
                      out=out.data_ptr(), num_index=2, width=8, num_rows=4, device=10_000, stream=0)
    # The failed call must leave the device and torch usable.
    torch.testing.assert_close(gather.gather_rows(x, index), x[index])


# ---------------------------------------------------------------- mask_tokens
def _mask_inputs(batch, length, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g).to(dtype)
    special = torch.zeros(batch, length, dtype=torch.int64)
    special[:, 0] = 1
    special[:, -1] = 1
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    attention = (torch.arange(length).view(1, -1) < lengths.view(-1, 1)).to(torch.int64)
    return ids, special, attention


def _check_mask(ids, special, attention, p, seed, exact):
    kwargs = dict(mask_token_id=MASK_ID, vocab_size=VOCAB, mlm_probability=p, seed=seed, exact=exact)
    on = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    got = masking.mask_tokens(on(ids), on(special), on(attention), **kwargs)
    want = masking_reference.mask_tokens(ids, special, attention, **kwargs)
    cpu = masking.mask_tokens(ids, special, attention, **kwargs)
    for g, w, c, what in zip(got, want, cpu, ("masked_ids", "labels")):
        assert g.device.type == "cuda"
        assert_equal(g.cpu(), w, what)
        assert_equal(c, w, f"{what} (CPU kernel)")
    return got


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (32, 128), (8, 512), (2, 5000)])
def test_mask_tokens(shape, dtype, exact):
    ids, special, attention = _mask_inputs(*shape, dtype, seed=shape[1])
    for p in (0.15, 0.0, 1.0, 0.5):
        _check_mask(ids, special, attention, p, seed=2**62 + 17, exact=exact)
    _check_mask(ids, None, None, 0.15, seed=3, exact=exact)


def test_mask_tokens_exact_counts_and_strides():
    ids, special, attention = _mask_inputs(64, 300, torch.int64, seed=9)
    _, labels = _check_mask(ids.t().contiguous().t(), special.bool(), attention.to(torch.uint8)[:, :].float(),
                            0.15, seed=5, exact=True)
    n_eligible = ((special == 0) & (attention != 0)).sum(1).tolist()
    assert (labels != -100).sum(1).tolist() == [math.floor(n * 0.15 + 0.5) for n in n_eligible]
    _check_mask(ids[:, ::3], special[:, ::3], attention[:1, ::3].expand(64, -1), 0.3, seed=6, exact=True)


def test_mask_tokens_empty_and_side_stream():
    empty = torch.empty(0, 7, dtype=torch.int64, device=DEV)
    masked, labels = masking.mask_tokens(empty, None, None, mask_token_id=MASK_ID, vocab_size=VOCAB,
                                         mlm_probability=0.15, seed=0, exact=True)
    assert masked.shape == labels.shape == (0, 7)
    ids, special, attention = _mask_inputs(16, 256, torch.int64, seed=1)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = masking.mask_tokens(ids.to(DEV), special.to(DEV), attention.to(DEV), mask_token_id=MASK_ID,
                                  vocab_size=VOCAB, mlm_probability=0.15, seed=4, exact=True)
    stream.synchronize()
    want = masking_reference.mask_tokens(ids, special, attention, mask_token_id=MASK_ID, vocab_size=VOCAB,
                                         mlm_probability=0.15, seed=4, exact=True)
    assert_equal(got[1].cpu(), want[1], "labels on a side stream")


# ----------------------------------------------------------- masked_positions
def _labels(shape, keep, dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, shape, generator=g).to(dtype)
    return torch.where(torch.rand(shape, generator=g) < keep, labels, torch.full_like(labels, -100))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape,keep", [((1,), 1.0), ((32, 128), 0.15), ((32, 512), 0.0), ((32, 512), 1.0),
                                        ((3, 1000, 1000), 0.15)])
def test_masked_positions(shape, keep, dtype):
    labels = _labels(shape, keep, dtype)
    numel = labels.numel()
    expected_count = int((labels != -100).sum())
    for capacity in (None, 0, 1, expected_count // 2, expected_count, numel + 100):
        got = masking.masked_positions(labels.to(DEV), ignore_index=-100, capacity=capacity)
        want = masking_reference.masked_positions(labels, ignore_index=-100, capacity=capacity)
        assert_equal(got[0].cpu(), want[0], f"index (capacity {capacity})")
        assert_equal(got[1].cpu(), want[1], f"count (capacity {capacity})")


def test_masked_positions_with_capacity_does_not_sync():
    labels = _labels((32, 512), 0.15).to(DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        index, count = masking.masked_positions(labels, ignore_index=-100, capacity=4096)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = masking_reference.masked_positions(labels.cpu(), ignore_index=-100, capacity=4096)
    assert_equal(index.cpu(), want[0], "index")
    assert_equal(count.cpu(), want[1], "count")


# ------------------------------------------------------------ gather / scatter
def _rows(n, d, dtype, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("n,d,m", [(1, 1, 1), (10, 3, 25), (4096, 768, 600), (50, 17, 0), (300, 1025, 77)])
def test_gather_rows(n, d, m, dtype, index_dtype):
    x = _rows(n, d, dtype, seed=n).to(DEV)
    index = torch.randint(0, n, (m,), generator=torch.Generator().manual_seed(1)).to(DEV, index_dtype)
    out = gather.gather_rows(x, index)
    assert_equal(out, gather_reference.gather_rows(x, index.long()), "gather_rows")
    # Misaligned (2-byte offset) and row-strided views take the narrow copy paths.
    wide = _rows(n, d + 3, dtype, seed=2).to(DEV)
    for view in (wide[:, 1:d + 1], wide[:, :d], x[:, ::2] if d > 1 else x):
        assert_equal(gather.gather_rows(view, index), view[index.long()], "strided gather_rows")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("n,d,m", [(1, 1, 1), (10, 3, 25), (4096, 768, 600), (50, 17, 0), (7, 129, 3000)])
def test_scatter_add_rows(n, d, m, dtype, index_dtype):
    grad = _rows(m, d, dtype, seed=m).to(DEV)
    index = torch.randint(0, n, (m,), generator=torch.Generator().manual_seed(3)).to(DEV, index_dtype)
    want = gather_reference.scatter_add_rows(grad.double().cpu(), index.long().cpu(), n)
    cpu = gather.scatter_add_rows(grad.cpu(), index.cpu(), n, deterministic=True)
    det = gather.scatter_add_rows(grad, index, n, deterministic=True)
    assert_equal(det.cpu(), cpu, "deterministic CUDA scatter == CPU kernel, bit for bit")
    assert_equal(gather.scatter_add_rows(grad, index, n, deterministic=True), det, "repeatable")
    atomic = gather.scatter_add_rows(grad, index, n, deterministic=False)
    assert_close(atomic.cpu(), want, dtype, "atomic scatter_add_rows")
    assert_close(det.cpu(), want, dtype, "deterministic scatter_add_rows")


def test_scatter_add_rows_deterministic_one_long_run():
    grad = _rows(1000, 64, torch.float32, seed=5).to(DEV)
    index = torch.zeros(1000, dtype=torch.int64, device=DEV)  # one long run
    det = gather.scatter_add_rows(grad, index, 3, deterministic=True)
    assert_equal(det.cpu(), gather.scatter_add_rows(grad.cpu(), index.cpu(), 3, deterministic=True), "one run")
    assert (det[1:] == 0).all()


@pytest.mark.parametrize("deterministic", [False, True])
def test_gather_and_scatter_with_out_of_range_index_stay_in_bounds(deterministic):
    # Value checks off: a NaN row for the gather, a dropped row for the scatter (both
    # scatter paths), never an access outside the buffers (run under compute-sanitizer too).
    x = torch.randn(6, 5, device=DEV)
    index = torch.tensor([2, 6, -1, 2, 9**9, 0], device=DEV)
    bad = torch.tensor([False, True, True, False, True, False], device=DEV)
    out = gather.gather_rows(x, index)
    assert out[bad].isnan().all() and torch.equal(out[~bad], x[index[~bad]])
    grad = torch.randn(6, 5, device=DEV)
    got = gather.scatter_add_rows(grad, index, 6, deterministic=deterministic)
    expected = torch.zeros(6, 5, device=DEV).index_add_(0, index[~bad], grad[~bad])
    torch.testing.assert_close(got, expected)
