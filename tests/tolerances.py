"""The one tolerance table: per-tensor relative norm error, by the dtype a backend computed in.

Error is ||actual - expected|| / ||expected|| against a reference computed in
fp64 (float ops), so it does not depend on a tensor's scale. Exact (integer)
outputs are compared bit for bit instead.
"""
from __future__ import annotations

import torch

RELATIVE_TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-2,
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        bad = (~torch.isfinite(actual)).sum().item()
        raise AssertionError(f"{bad} non-finite values (NaN/inf) in the result")
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "tensor") -> None:
    """Relative norm error within the table's tolerance for `dtype`; zero tensors must match absolutely."""
    tolerance = RELATIVE_TOLERANCE[dtype]
    error = relative_error(actual, expected)
    if error > tolerance:
        raise AssertionError(f"{what}: relative error {error:.3e} > {tolerance:.0e} ({dtype})")


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor") -> None:
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise AssertionError(f"{what}: {tuple(actual.shape)} {actual.dtype} != expected {tuple(expected.shape)} {expected.dtype}")
    if not torch.equal(actual.cpu(), expected.cpu()):
        mismatches = (actual.cpu() != expected.cpu()).sum().item()
        raise AssertionError(f"{what}: {mismatches} entries differ from the reference")
