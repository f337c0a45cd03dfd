"""mlm_cross_entropy alone, forward + backward, at bert-base sizes (H = 768, V = 30522).

Variants:
  * chunked: fastmlm's compiled backend (fastmlm/kernels/compiled/cross_entropy.py),
    logits streamed over vocabulary chunks, never [M, V] in memory;
  * dense:   `F.cross_entropy(hidden @ W.T + b, targets)` with autograd on the
    same M rows (materialises the [M, V] logits and their gradient);
  * dense_all_positions (CPU, M = 150 only): the HuggingFace way, the dense
    loss over all 1024 positions of a batch of 8 x 128 with the unmasked ones
    ignored - the baseline fastmlm's CPU MLM-head target is stated against.
Each variant's gradients are checked against the dense loss in fp32 before timing (errors in
extra_info). GFLOP/s count 2*M*H*V per matmul actually run: 3 for dense (logits, d_hidden,
d_weight), 4 for chunked (it recomputes the logits in backward). CPU rounds are
few: M = 2000 is ~300 GFLOP per round.
Run: python -m pytest benchmarks/test_cross_entropy.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastmlm.kernels.compiled import cross_entropy as ce

HIDDEN, VOCAB, IGNORE = 768, 30522, -100
ALL_POSITIONS = 8 * 128


def make_problem(rows, device, dtype, total_rows=None):
    """hidden [total_rows, H] whose first `rows` rows have targets (the rest ignored)."""
    gen = torch.Generator().manual_seed(0)
    total_rows = total_rows or rows
    hidden = torch.randn(total_rows, HIDDEN, generator=gen).to(device, dtype)
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02).to(device, dtype)
    bias = torch.zeros(VOCAB).to(device, dtype)
    targets = torch.full((total_rows,), IGNORE, dtype=torch.int64)
    targets[:rows] = torch.randint(0, VOCAB, (rows,), generator=gen)
    return hidden, weight, bias, targets.to(device)


def chunked_step(hidden, weight, bias, targets):
    row_loss, lse = ce.cross_entropy_forward(hidden, weight, bias, targets, ignore_index=IGNORE)
    count = (targets != IGNORE).sum().clamp(min=1)
    grad_row_loss = torch.ones_like(row_loss) / count  # d(mean)/d(row_loss)
    return ce.cross_entropy_backward(grad_row_loss, hidden, weight, bias, targets, lse, ignore_index=IGNORE)


def dense_step(hidden, weight, bias, targets):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    bias = bias.detach().requires_grad_()
    loss = F.cross_entropy((hidden @ weight.T + bias).float(), targets, ignore_index=IGNORE)
    loss.backward()
    return hidden.grad, weight.grad, bias.grad


STEPS = {"chunked": chunked_step, "dense": dense_step, "dense_all_positions": dense_step}


def validation_errors(gradients, hidden, weight, bias, targets) -> dict[str, float]:
    """Relative errors of a variant's three gradients against the dense loss in fp32 on the same values."""
    expected = dense_step(hidden.float(), weight.float(), bias.float(), targets)
    return {name: float((got.float() - want).norm() / want.norm().clamp(min=1e-30))
            for name, got, want in zip(("d_hidden", "d_weight", "d_bias"), gradients, expected)}


def run(benchmark, device, dtype, rows, variant, rounds, warmup_rounds):
    total = ALL_POSITIONS if variant == "dense_all_positions" else rows
    problem = make_problem(rows, device, dtype, total)
    step = STEPS[variant]
    # Checked before timing (and warming up): a gross error fails, every error is recorded.
    errors = validation_errors(step(*problem), *problem)
    assert max(errors.values()) <= (0.1 if dtype == torch.bfloat16 else 1e-3), f"{variant}: {errors}"

    def timed():
        step(*problem)
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    matmuls = 4 if variant == "chunked" else 3
    flops = matmuls * 2 * total * HIDDEN * VOCAB
    if benchmark.stats is None:  # --benchmark-disable: the body ran once as a smoke test
        return
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(rows=rows, rows_computed=total, gflop_per_s=flops / seconds / 1e9,
                                **{f"error_{name}": value for name, value in errors.items()},
                                peak_logit_bytes=(total * (ce.default_chunk_size(VOCAB, total) if variant == "chunked"
                                                           else VOCAB) * 4))


@pytest.mark.skipif(ce.available("cpu") is not None, reason=str(ce.available("cpu")))
@pytest.mark.parametrize("rows,variant", [(150, "chunked"), (150, "dense"), (150, "dense_all_positions"),
                                          (2000, "chunked"), (2000, "dense")])
def test_cpu_fp32(benchmark, rows, variant):
    big = rows > 1000 or variant == "dense_all_positions"
    run(benchmark, "cpu", torch.float32, rows, variant, rounds=1 if big else 3, warmup_rounds=0 if big else 1)


@pytest.mark.skipif(not torch.cuda.is_available() or ce.available("cuda") is not None,
                    reason="needs a GPU and fastmlm._C built with CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("rows", [150, 2000, 16384])
@pytest.mark.parametrize("variant", ["chunked", "dense"])
def test_cuda(benchmark, dtype, rows, variant):
    run(benchmark, "cuda", dtype, rows, variant, rounds=20, warmup_rounds=3)
