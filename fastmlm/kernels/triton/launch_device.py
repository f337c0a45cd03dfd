"""Triton compiles for and launches on the *current* CUDA device, whatever device the
tensors are on: a call with tensors on cuda:1 while cuda:0 is current would run on
cuda:0 with cuda:1's addresses. The entry points of the kernel modules are wrapped
so that the first tensor's device is current for the call (no-op on CPU tensors,
which only the interpreter runs)."""
from __future__ import annotations

import functools

import torch


def on_input_device(entry_point):
    """Make `entry_point(first_tensor, ...)` run with first_tensor's CUDA device current."""

    @functools.wraps(entry_point)
    def run(first, *args, **kwargs):
        if isinstance(first, torch.Tensor) and first.is_cuda:
            with torch.cuda.device(first.device):
                return entry_point(first, *args, **kwargs)
        return entry_point(first, *args, **kwargs)

    return run
