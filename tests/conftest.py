"""Test-wide set-up.

Without a GPU, Triton kernels are tested in Triton's interpreter on CPU
tensors. The variable must be set before any `@triton.jit` function is
defined, hence here, before test modules import fastmlm's kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on the 2-core CI machine")
