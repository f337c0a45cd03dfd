"""gather_rows (the masked rows of the encoder output, as the MLM head takes
them) and its backward scatter_add_rows: compiled kernels against the
reference (`index_select` / `index_add_`) and boolean-mask indexing
(`hidden[labels != -100]`, which runs nonzero). BERT sizes: batch 32, length
128 / 512, hidden 768, 15% of positions. extra_info has GB/s (bytes read + written).
CPU always; CUDA when a GPU is visible.
Run: python -m pytest benchmarks/test_gather.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

from fastmlm.kernels.compiled import gather
from fastmlm.reference import gather as reference

BATCH, HIDDEN, P = 32, 768, 0.15
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _problem(length, dtype, device):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(BATCH * length, HIDDEN, generator=g).to(device, dtype)
    masked = torch.rand(BATCH * length, generator=g) < P
    index = torch.nonzero(masked).view(-1).to(device)
    return hidden, masked.to(device), index


def _bench(benchmark, device, fn, rounds, moved_bytes):
    def run():
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    run()
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: the body ran once as a smoke test
        return
    benchmark.extra_info["GB_per_s"] = moved_bytes / benchmark.stats.stats.mean / 1e9


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("length", [128, 512])
@pytest.mark.parametrize("impl", ["compiled", "index_select", "bool_mask"])
def test_gather_rows(benchmark, impl, length, dtype, device):
    if impl == "compiled" and gather.available(device) is not None:
        pytest.skip(gather.available(device))
    hidden, masked, index = _problem(length, DTYPES[dtype], device)
    fns = {
        "compiled": lambda: gather.gather_rows(hidden, index),
        "index_select": lambda: reference.gather_rows(hidden, index),
        "bool_mask": lambda: hidden[masked],
    }
    benchmark.group = f"gather_rows {dtype} {device} {BATCH}x{length}x{HIDDEN}"
    moved = 2 * index.numel() * HIDDEN * hidden.element_size()
    _bench(benchmark, device, fns[impl], rounds=30 if device == "cpu" else 300, moved_bytes=moved)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("length", [128, 512])
@pytest.mark.parametrize("impl", ["compiled", "compiled_deterministic", "index_add"])
def test_scatter_add_rows(benchmark, impl, length, dtype, device):
    if impl.startswith("compiled") and gather.available(device) is not None:
        pytest.skip(gather.available(device))
    hidden, _, index = _problem(length, DTYPES[dtype], device)
    grad = torch.randn(index.numel(), HIDDEN, device=device).to(DTYPES[dtype])
    num_rows = hidden.shape[0]
    fns = {
        "compiled": lambda: gather.scatter_add_rows(grad, index, num_rows, deterministic=False),
        "compiled_deterministic": lambda: gather.scatter_add_rows(grad, index, num_rows, deterministic=True),
        "index_add": lambda: reference.scatter_add_rows(grad, index, num_rows),
    }
    benchmark.group = f"scatter_add_rows {dtype} {device} {BATCH}x{length}x{HIDDEN}"
    # Reads the gradient rows, writes the whole [num_rows, HIDDEN] output.
    moved = (index.numel() + num_rows) * HIDDEN * hidden.element_size()
    _bench(benchmark, device, fns[impl], rounds=10 if device == "cpu" else 300, moved_bytes=moved)
