"""mask_tokens and masked_positions: compiled kernels against the reference and
against the usual boolean-mask + `nonzero` idiom, at BERT sizes (batch 32,
length 128 / 512). CPU always; CUDA cases (timed with torch.cuda.synchronize)
when a GPU is visible.
Run: python -m pytest benchmarks/test_masking.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

from fastmlm.kernels.compiled import masking
from fastmlm.reference import masking as reference

BATCH, VOCAB, MASK_ID, P = 32, 30522, 103, 0.15
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _skip_unless_compiled(device):
    reason = masking.available(device)
    if reason is not None:
        pytest.skip(reason)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _batch(length, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, VOCAB, (BATCH, length), generator=g)
    special = torch.zeros(BATCH, length, dtype=torch.int64)
    special[:, 0] = special[:, -1] = 1
    lengths = torch.randint(length // 2, length + 1, (BATCH,), generator=g)
    attention = (torch.arange(length).view(1, -1) < lengths.view(-1, 1)).to(torch.int64)
    return ids.to(device), special.to(device), attention.to(device)


def _bench(benchmark, device, fn, rounds):
    def run():
        out = fn()
        _sync(device)
        return out

    run()  # warm-up (and CUDA context / kernel load)
    return benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("length", [128, 512])
@pytest.mark.parametrize("budget", ["bernoulli", "exact"])
@pytest.mark.parametrize("impl", ["compiled", "reference"])
def test_mask_tokens(benchmark, impl, budget, length, device):
    if impl == "compiled":
        _skip_unless_compiled(device)
    ids, special, attention = _batch(length, device)
    fn = masking.mask_tokens if impl == "compiled" else reference.mask_tokens
    benchmark.group = f"mask_tokens {budget} {device} {BATCH}x{length}"
    _bench(benchmark, device, lambda: fn(ids, special, attention, mask_token_id=MASK_ID, vocab_size=VOCAB,
                                         mlm_probability=P, seed=1234, exact=budget == "exact"),
           rounds=20 if device == "cpu" else 200)
    if benchmark.stats is None:  # --benchmark-disable: the body ran once as a smoke test
        return
    benchmark.extra_info["tokens_per_s"] = BATCH * length / benchmark.stats.stats.mean


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("length", [128, 512])
@pytest.mark.parametrize("impl", ["compiled_capacity", "compiled", "reference_capacity", "nonzero"])
def test_masked_positions(benchmark, impl, length, device):
    if impl.startswith("compiled"):
        _skip_unless_compiled(device)
    ids, special, attention = _batch(length, device)
    _, labels = reference.mask_tokens(ids, special, attention, mask_token_id=MASK_ID, vocab_size=VOCAB,
                                      mlm_probability=P, seed=1, exact=True)
    capacity = int(BATCH * length * P) + 64
    fns = {
        "compiled_capacity": lambda: masking.masked_positions(labels, ignore_index=-100, capacity=capacity),
        "compiled": lambda: masking.masked_positions(labels, ignore_index=-100, capacity=None),
        "reference_capacity": lambda: reference.masked_positions(labels, ignore_index=-100, capacity=capacity),
        # The usual idiom: a boolean mask and nonzero (a host sync on CUDA).
        "nonzero": lambda: torch.nonzero(labels.view(-1) != -100).view(-1),
    }
    benchmark.group = f"masked_positions {device} {BATCH}x{length}"
    _bench(benchmark, device, fns[impl], rounds=50 if device == "cpu" else 500)
