"""The memory a step needs besides its results, from the allocator's events in time order.

Peak minus what a step keeps undercounts whenever a result is made after the peak (a
dense MLM head frees its logits before it allocates the weight gradient), so the events'
addresses are followed instead: an allocation still alive at the end is a result, and
the transient memory is the most the step holds at any moment beyond the results it has
made so far. Used by the memory test (tests/ops/test_mlm_head_memory.py) and the MLM-head
benchmark.
"""
from __future__ import annotations

import json
import os
import tempfile


def memory_from_timeline(timeline) -> tuple[int, int, int]:
    """(peak, kept, transient) bytes from (address, +bytes allocated / -bytes freed) in time order.

    peak: the running sum's maximum (frees of memory allocated before the step lower it);
    kept: what the step leaves allocated; transient: see the module docstring.
    """
    alive = {}  # address -> index of the allocation still holding it
    for i, (address, delta) in enumerate(timeline):
        if delta > 0:
            alive[address] = i
        elif address in alive:
            del alive[address]
    kept_events = set(alive.values())
    current = kept = peak = transient = 0
    for i, (_, delta) in enumerate(timeline):
        current += delta
        if i in kept_events:
            kept += delta
        peak = max(peak, current)
        transient = max(transient, current - kept)
    return peak, kept, transient


def cpu_timeline(step):
    """(result of step(), its CPU allocator events) from the profiler's trace, which carries addresses."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = step()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        raise RuntimeError("the profiler recorded no CPU memory events")
    events.sort(key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    return result, [(e["args"]["Addr"], e["args"]["Bytes"]) for e in events]
