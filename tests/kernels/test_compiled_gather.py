"""fastmlm._C's CPU gather_rows / scatter_add_rows against the PyTorch reference.

gather_rows is a copy: bit-exact. scatter_add_rows sums in fp32 in increasing
index position and rounds once; that is checked bit for bit against a loop
with the same order (which also pins the fp16/bf16 rounding of
csrc/common/dtype.h to torch's `.to`), and against the official reference
with the tolerance table. CUDA versions: tests/gpu/test_cuda_kernels.py.
"""
import pytest
import torch

from fastmlm import _ext
from fastmlm.reference import gather as reference

if _ext.load_error() is not None:
    pytest.skip(f"fastmlm._C unavailable: {_ext.load_error()}", allow_module_level=True)

from fastmlm.kernels.compiled import gather  # noqa: E402

from tests.tolerances import assert_close, assert_equal  # noqa: E402

FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def ordered_scatter_add(grad, index, num_rows):
    """fp32 sums 0 + g[m1] + g[m2] + ... over m1 < m2 < ..., rounded once to grad's dtype."""
    acc = torch.zeros(num_rows, grad.shape[1], dtype=torch.float32)
    index = index.long()
    # Entries with the same occurrence rank hit distinct rows: one vector add per rank.
    occurrence = torch.zeros_like(index)
    seen: dict[int, int] = {}
    for m, row in enumerate(index.tolist()):
        occurrence[m] = seen.get(row, 0)
        seen[row] = occurrence[m].item() + 1
    for rank in range(int(occurrence.max()) + 1 if len(index) else 0):
        rows = occurrence == rank
        acc[index[rows]] += grad[rows].float()
    return acc.to(grad.dtype)


def _data(n, d, m, dtype, index_dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    index = torch.randint(0, n, (m,), generator=g).to(index_dtype)
    return x, index


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("n,d,m", [(1, 1, 1), (10, 3, 25), (64, 768, 200), (33, 17, 0)])
def test_gather_rows(n, d, m, dtype, index_dtype):
    x, index = _data(n, d, m, dtype, index_dtype)
    assert_equal(gather.gather_rows(x, index), reference.gather_rows(x, index.long()), "gather_rows")


@pytest.mark.parametrize("dtype", FLOATS)
def test_gather_rows_strided(dtype):
    x, index = _data(40, 96, 60, dtype, seed=1)
    wide = torch.randn(40, 200).to(dtype)
    for view in (wide[:, 3:99], x[::2], x.t().contiguous().t(), x[:, ::3]):  # row stride, column stride
        idx = index % view.shape[0]
        assert_equal(gather.gather_rows(view, idx), view[idx], "strided gather_rows")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("n,d,m", [(1, 1, 1), (10, 3, 25), (64, 768, 200), (50, 17, 0), (5, 129, 300)])
def test_scatter_add_rows(n, d, m, dtype, index_dtype):
    grad, _ = _data(m, d, 0, dtype, seed=2) if m else (torch.empty(0, d, dtype=dtype), None)
    index = torch.randint(0, n, (m,), generator=torch.Generator().manual_seed(3)).to(index_dtype)
    got = gather.scatter_add_rows(grad, index, n, deterministic=True)
    assert_equal(got, ordered_scatter_add(grad, index, n), "scatter_add_rows (fixed order)")
    assert_close(got, reference.scatter_add_rows(grad.double(), index.long(), n), dtype, "scatter_add_rows")
    again = gather.scatter_add_rows(grad, index, n, deterministic=False)
    assert_equal(again, got, "CPU scatter is deterministic either way")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scatter_add_rows_rounding_edges(dtype):
    # Sums that land on subnormals, ties, the largest finite values and overflow.
    info = torch.finfo(dtype)
    values = torch.tensor([info.tiny, info.tiny / 4, info.max, info.max / 2, 1.0, 2.0 ** -11, -3.0, 1e-7, 65504.0,
                           float("inf"), float("nan"), -0.0], dtype=torch.float32).to(dtype)
    grad = values.view(-1, 1).repeat(4, 3)
    g = torch.Generator().manual_seed(4)
    grad = grad * torch.randint(1, 4, grad.shape, generator=g).to(dtype)
    index = torch.randint(0, 6, (grad.shape[0],), generator=g)
    got = gather.scatter_add_rows(grad, index, 6, deterministic=True)
    want = ordered_scatter_add(grad, index, 6)
    # Bit for bit, except NaN payloads (torch keeps them, the kernels write the quiet NaN).
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


def test_scatter_add_rows_strided_grad():
    grad = torch.randn(30, 100)[:, 5:69]
    index = torch.randint(0, 12, (30,))
    got = gather.scatter_add_rows(grad, index, 12, deterministic=True)
    assert_equal(got, ordered_scatter_add(grad.contiguous(), index, 12), "strided scatter_add_rows")
    got = gather.scatter_add_rows(grad[:, ::2], index, 12, deterministic=True)
    assert_equal(got, ordered_scatter_add(grad[:, ::2].contiguous(), index, 12), "column-strided scatter_add_rows")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_parallel_paths(dtype):
    x, index = _data(4096, 768, 2048, dtype, seed=7)  # past the OpenMP thresholds
    assert_equal(gather.gather_rows(x, index), x[index], "gather_rows")
    grad = x[:2048]
    got = gather.scatter_add_rows(grad, index, 4096, deterministic=True)
    assert_equal(got, ordered_scatter_add(grad, index, 4096), "scatter_add_rows")


def test_rejects_bad_input():
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="float32"):
        gather.gather_rows(x.double(), torch.tensor([0]))
    with pytest.raises(TypeError, match="int32 or int64"):
        gather.gather_rows(x, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="1-D"):
        gather.gather_rows(x, torch.tensor([[0]]))
    with pytest.raises(ValueError, match="2-D"):
        gather.scatter_add_rows(x.view(-1), torch.tensor([0]), 4, deterministic=True)
    with pytest.raises(ValueError, match="entries"):
        gather.scatter_add_rows(x, torch.tensor([0]), 4, deterministic=True)


def test_available():
    assert gather.available("cpu") is None
    if not _ext.has_cuda_kernels():
        assert "without CUDA" in gather.available("cuda")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_out_of_range_index_reads_and_writes_nothing(dtype, deterministic):
    # The op checks index values unless value checks are off; the kernels then still
    # stay inside their buffers: a NaN row for the gather, a dropped row for the scatter.
    x = torch.randn(6, 5).to(dtype)
    index = torch.tensor([2, 6, -1, 2, 9**9, 0])
    out = gather.gather_rows(x, index)
    bad = torch.tensor([False, True, True, False, True, False])
    assert out[bad].isnan().all()
    assert_equal(out[~bad], x[index[~bad]])
    grad = torch.randn(6, 5).to(dtype)
    expected = ordered_scatter_add(grad[~bad], index[~bad], 6)
    assert_equal(gather.scatter_add_rows(grad, index, 6, deterministic=deterministic), expected)
