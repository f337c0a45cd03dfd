"""Cases for gather_rows (forward and the scatter-add gradient)."""
import torch

from fastmlm.ops import gather_rows
from tests.ops.harness import OpCase, strided_view


def gather_case(name, rows, width, picks, *, index_dtype=torch.int64, strided=False, repeats=True):
    def build(device, dtype, generator):
        full_width = width * 2 if strided else width
        x = torch.randn(rows, full_width, generator=generator, dtype=torch.float64).to(dtype)
        x = x[:, ::2] if strided else x  # rows with a stride, and below an index with one
        if repeats:
            index = torch.randint(0, rows, (picks,), generator=generator)
        else:
            index = torch.randperm(rows, generator=generator)[:picks]
        index = index.to(index_dtype).to(device)
        return {"x": x.to(device), "index": strided_view(index) if strided else index}

    return OpCase("gather_rows", name, build, lambda x, index: gather_rows(x, index), grads=("x",))


CASES = [
    gather_case("one-row", 1, 1, 1),
    gather_case("empty-selection", 7, 5, 0),
    gather_case("width-1", 9, 1, 4),
    gather_case("odd-width-int32", 13, 67, 11, index_dtype=torch.int32),
    gather_case("repeated-rows", 10, 64, 40),
    gather_case("strided", 20, 24, 9, strided=True),
    gather_case("bert-like", 300, 768, 45, repeats=False),
]
