"""The harness catches a wrong backend and an output a kernel forgets to write."""
import pytest
import torch

from fastmlm.ops.dispatch import TABLES, Backend
from fastmlm.reference import gather as gather_ref
from tests.ops.cases.gather import gather_case
from tests.ops.cases.masking import positions_case
from tests.ops.harness import check_case


@pytest.fixture
def swap_backend():
    saved = []

    def swap(family, backend):
        table = TABLES[family]
        saved.append((table, backend.name, table.backends.get(backend.name)))
        table.backends[backend.name] = backend

    yield swap
    for table, name, previous in reversed(saved):
        if previous is None:
            table.backends.pop(name, None)
        else:
            table.backends[name] = previous


def _always(*args):
    return None


def test_slightly_wrong_forward_fails(swap_backend):
    def forward(x, index):
        out = gather_ref.gather_rows(x, index)
        return out + 1e-3 * out.abs().max()

    swap_backend("gather_rows", Backend("cpu", _always, forward, gather_ref.scatter_add_rows))
    with pytest.raises(AssertionError, match="output 0: relative error"):
        check_case(gather_case("selftest", 9, 16, 5), "cpu", "cpu", torch.float32)


def test_wrong_gradient_fails(swap_backend):
    def backward(grad, index, num_rows):
        return gather_ref.scatter_add_rows(grad, index.flip(0), num_rows)

    swap_backend("gather_rows", Backend("cpu", _always, gather_ref.gather_rows, backward))
    with pytest.raises(AssertionError, match="grad of x"):
        check_case(gather_case("selftest", 9, 16, 5), "cpu", "cpu", torch.float32)


def test_unwritten_output_is_caught_by_poison(swap_backend):
    def forward(x, index):
        out = torch.empty(index.shape[0], x.shape[1], dtype=x.dtype)
        out[:-1] = x[index[:-1]]  # forgets the last row
        return out

    swap_backend("gather_rows", Backend("cpu", _always, forward, gather_ref.scatter_add_rows))
    with pytest.raises(AssertionError, match="non-finite"):
        check_case(gather_case("selftest", 9, 16, 5), "cpu", "cpu", torch.float32)


def test_unwritten_integer_tail_is_caught(swap_backend):
    from fastmlm.reference import masking

    def forward(labels, ignore_index, capacity):
        index, count = masking.masked_positions(labels, ignore_index=ignore_index, capacity=capacity)
        out = torch.empty_like(index)
        n = min(int(count), capacity)
        out[:n] = index[:n]  # leaves the tail as whatever memory held
        return out, count

    swap_backend("masked_positions", Backend("cpu", _always, forward))
    with pytest.raises(AssertionError, match="entries differ"):
        check_case(positions_case("selftest", (4, 16), capacity=40), "cpu", "cpu", torch.int64)


def test_correct_backend_passes(swap_backend):
    swap_backend("gather_rows", Backend("cpu", _always, gather_ref.gather_rows, gather_ref.scatter_add_rows))
    check_case(gather_case("selftest", 9, 16, 5), "cpu", "cpu", torch.float32)
