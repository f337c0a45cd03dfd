"""The MLM loss must not materialise [M, V] logits: a memory test, not a timing one.

At bert-base scale (M = 2000 masked rows, V = 30522, H = 768, fp32 on CPU) the memory a
forward + backward allocates beyond its inputs, outputs and gradients must stay under
25% of the dense logits (M * V * 4 bytes = 244 MB), for both ops that own the loss:
`fastmlm.ops.mlm_cross_entropy` (decoder + loss on given rows) and `fastmlm.ops.mlm_head`
(the whole head: gather of the masked rows out of N = 4096, dense, GELU, LayerNorm,
decoder, loss; its saved [M, H] activations count as extra). Measured in a fresh
subprocess (so nothing earlier in the test session counts), after a small warm-up run has
loaded every code path, two ways that must both pass: peak RSS minus the results, and the
profiler's allocation timeline followed by address (tests/memory_timeline.py), which also
counts what is held before a late result is made.

Each op runs with whatever backend dispatch picks for CPU tensors (the compiled `cpu`
backend once fastmlm._C is built). The dense `torch` reference cannot pass by design;
when it is all dispatch has, the test is skipped, and a control test checks that the
measurement does see its dense logits (so the test itself can fail).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

M, V, H = 2000, 30522, 768
N = 4096  # rows of hidden_all the head gathers its M masked rows from
OPS = ("mlm_cross_entropy", "mlm_head")
DENSE_LOGITS_BYTES = M * V * 4
LIMIT_FRACTION = 0.25

_MEASURE = r"""
import gc, json, os, sys
import torch
from fastmlm.ops import mlm_cross_entropy, mlm_head
from fastmlm.ops.cross_entropy import MLM_CROSS_ENTROPY
from fastmlm.ops.mlm_head import MLM_HEAD
torch.set_num_threads(2)
torch.manual_seed(0)
op = sys.argv[1]
M, V, H, N = map(int, sys.argv[2:6])

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def inputs(m, v, n):
    weight = (torch.randn(v, H) * 0.05).requires_grad_()
    bias = torch.zeros(v, requires_grad=True)
    targets = torch.randint(0, v, (m,))
    targets[::7] = -100
    if op == "mlm_cross_entropy":
        return dict(hidden=torch.randn(m, H, requires_grad=True), weight=weight, bias=bias, targets=targets)
    return dict(hidden_all=torch.randn(n, H, requires_grad=True), index=torch.randperm(n)[:m],
                dense_weight=(torch.randn(H, H) / H ** 0.5).requires_grad_(),
                dense_bias=torch.zeros(H, requires_grad=True), norm_weight=torch.ones(H, requires_grad=True),
                norm_bias=torch.zeros(H, requires_grad=True), decoder_weight=weight, decoder_bias=bias,
                targets=targets)

def backend(t):
    if op == "mlm_cross_entropy":
        return MLM_CROSS_ENTROPY.choose("cpu", t["hidden"], t["weight"], t["bias"], t["targets"], -100, 0.1, 0.0).name
    return MLM_HEAD.choose("cpu", t["hidden_all"]).name

def step(t):
    if op == "mlm_cross_entropy":
        loss = mlm_cross_entropy(t["hidden"], t["weight"], t["targets"], t["bias"], label_smoothing=0.1)
    else:
        loss = mlm_head(**t, label_smoothing=0.1)
    loss.backward()
    return loss

small = inputs(64, 1000, 128)  # load every code path (and its one-off buffers) at a small size
name = backend(small)
step(small)
del small
gc.collect()
tensors = inputs(M, V, N)
baseline = rss()
loss = step(tensors)
# VmHWM, the peak RSS of this process image. Not getrusage's ru_maxrss: Linux
# carries that across fork and exec, so it would include the RSS of the
# pytest process that started this one (a large one late in a full run).
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
kept = sum(t.grad.numel() * t.grad.element_size() for t in tensors.values() if t.requires_grad)
kept += loss.numel() * loss.element_size()
finite = bool(torch.isfinite(loss).item())
# The same step again under the profiler, whose events (with addresses) give the memory
# held beyond the results made so far at every moment (tests/memory_timeline.py): peak RSS
# minus the results undercounts when results are made after the peak.
from tests.memory_timeline import cpu_timeline, memory_from_timeline
for t in tensors.values():
    if t.requires_grad:
        t.grad = None
del loss
gc.collect()
_, timeline = cpu_timeline(lambda: step(tensors))
transient = memory_from_timeline(timeline)[2]
print(json.dumps(dict(backend=name, baseline=baseline, peak=peak, kept=kept,
                      extra=peak - baseline - kept, transient=transient, finite=finite)))
"""


def measure(op, backend=None):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the interpreter is far too slow at this size
    if backend is not None:
        env["FASTMLM_BACKEND"] = f"{op}={backend}"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", _MEASURE, op, str(M), str(V), str(H), str(N)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise AssertionError(f"measurement subprocess failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cpu_choice(op):
    """(backend name dispatch picks for CPU tensors of `op`, reasons of the others)."""
    from fastmlm.ops.cross_entropy import MLM_CROSS_ENTROPY
    from fastmlm.ops.mlm_head import MLM_HEAD

    if op == "mlm_cross_entropy":
        table = MLM_CROSS_ENTROPY
        probe = (torch.zeros(1, H), torch.zeros(V, H), torch.zeros(V), torch.zeros(1, dtype=torch.int64), -100, 0.1, 0.0)
    else:
        table, probe = MLM_HEAD, (torch.zeros(1, H),)
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        return table.choose("cpu", *probe).name, table.reasons("cpu", *probe)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_streamed_loss_allocates_far_less_than_dense_logits(op):
    backend, reasons = _cpu_choice(op)
    if backend == "torch":
        pytest.skip(f"dispatch picks the dense reference for CPU tensors of {op}; no streamed CPU backend: {reasons}")
    result = measure(op)
    assert result["backend"] == backend and result["finite"]
    limit = LIMIT_FRACTION * DENSE_LOGITS_BYTES
    for measured in ("extra", "transient"):  # peak RSS minus results; the allocator's timeline
        assert result[measured] < limit, (
            f"{op}: {backend} backend allocated {result[measured] / 2**20:.1f} MiB ({measured}) beyond inputs, "
            f"outputs and gradients; limit {limit / 2**20:.1f} MiB (25% of the "
            f"{DENSE_LOGITS_BYTES / 2**20:.0f} MiB dense logits)")


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_measurement_sees_the_dense_reference_logits(op):
    # Control: the same measurement on the dense reference must exceed the dense logits' size.
    result = measure(op, "torch")
    assert result["backend"] == "torch" and result["finite"]
    for measured in ("extra", "transient"):
        assert result[measured] > DENSE_LOGITS_BYTES, f"{op}: measured only {result[measured] / 2**20:.1f} MiB"
