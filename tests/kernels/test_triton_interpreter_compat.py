"""fastmlm's fixes to Triton 3.6's interpreter (fastmlm/kernels/triton/_interpreter_compat.py).

The kernel tests run in the interpreter on this machine; where it computes
differently from a GPU, those tests would check other arithmetic than the GPU's.
"""
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("checks the interpreter (TRITON_INTERPRET=1)", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import fastmlm.kernels.triton  # noqa: E402,F401  (installs the fixes)


@triton.jit
def _to_bf16_kernel(x_ptr, y_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets).to(tl.bfloat16))


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
    rows, cols = tl.arange(0, N)[:, None], tl.arange(0, N)[None, :]
    a = tl.load(a_ptr + rows * N + cols)
    b = tl.load(b_ptr + rows * N + cols)
    tl.store(c_ptr + rows * N + cols, tl.dot(a, b))


def test_fp32_to_bf16_rounds_to_nearest_even_as_a_gpu_does():
    # Ties and just-above-ties in both signs, a carry into the exponent, and random values.
    special = torch.tensor([1 + 2**-8 + 2**-10, 1 + 3 * 2**-9, -(1 + 2**-8 + 2**-10), 1.99999, 1 + 2**-8,
                            1 + 3 * 2**-8, 3.0e38, -0.0])
    x = torch.cat([special, torch.randn(1024 - special.numel(), generator=torch.Generator().manual_seed(0))])
    y = torch.empty(1024, dtype=torch.bfloat16)
    _to_bf16_kernel[(1,)](x, y, N=1024)
    assert torch.equal(y.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))


def test_bf16_dot_multiplies_values_not_bit_patterns():
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(16, 16, generator=g).to(torch.bfloat16) for _ in range(2))
    c = torch.empty(16, 16, dtype=torch.float32)
    _dot_kernel[(1,)](a, b, c, N=16)
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-5, atol=1e-5)
