"""Input checks shared by the ops: raised in Python before any kernel launch.

Shape, dtype and device checks read only metadata and always run. Value
checks (an index in range, `cu_seqlens` monotone) read tensor contents, which
on a GPU is a host synchronisation; they are skipped while torch.compile
traces, during CUDA graph capture, and inside `no_value_checks()`.
"""
from __future__ import annotations

import contextlib
import math
import operator
import os
import threading
from typing import Iterator, Optional

import torch

_local = threading.local()


@contextlib.contextmanager
def no_value_checks() -> Iterator[None]:
    """Skip checks that read device memory (for graph capture or a hot loop)."""
    previous = getattr(_local, "disabled", False)
    _local.disabled = True
    try:
        yield
    finally:
        _local.disabled = previous


def value_checks_enabled(*tensors: torch.Tensor) -> bool:
    if getattr(_local, "disabled", False) or os.environ.get("FASTMLM_VALUE_CHECKS", "1") == "0":
        return False
    if torch.compiler.is_compiling():
        return False
    if any(t.is_cuda for t in tensors) and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    if any(t.device.type == "meta" for t in tensors):
        return False
    return True


def check_tensor(name: str, t, *, ndim: Optional[int | tuple[int, ...]] = None, dtypes: Optional[tuple] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}, got {str(t.dtype).replace('torch.', '')}")


def check_same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def min_max(t: torch.Tensor) -> tuple[int, int]:
    """The smallest and largest entries of a non-empty integer tensor, in one device read
    (on a GPU each read is a host synchronisation: min() and max() apart would be two)."""
    return tuple(torch.stack(torch.aminmax(t)).tolist())


def check_index_range(name: str, index: torch.Tensor, upper: int, *, what: str = "rows") -> None:
    """Raise if any entry of `index` lies outside [0, upper) (value check)."""
    if index.numel() == 0 or not value_checks_enabled(index):
        return
    low, high = min_max(index)
    if low < 0 or high >= upper:
        bad = low if low < 0 else high
        raise IndexError(f"{name} contains {bad}, outside [0, {upper}) ({upper} {what})")


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_FLOAT_DTYPES = FLOAT_DTYPES + (torch.float64,)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_int(name: str, value, *, int64: bool = False) -> int:
    """`value` as a Python int: ints and integer scalars (numpy, 0-d tensors) pass; floats
    and bools are refused, since int() would silently truncate 3.7 or accept True."""
    try:
        if isinstance(value, bool):
            raise TypeError
        result = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if int64 and not -2**63 <= result < 2**63:
        raise ValueError(f"{name} must fit in int64, got {result}")
    return result


def check_loss_options(ignore_index, reduction: str, reductions: tuple[str, ...], label_smoothing: float,
                       z_loss: float) -> None:
    """The scalar options of the cross-entropy losses (mlm_cross_entropy, mlm_head)."""
    # An int, not a float: the kernels compare targets with int(ignore_index), the mean's
    # count with the value itself, and 1.5 would make the two disagree.
    check_int("ignore_index", ignore_index, int64=True)
    if reduction not in reductions:
        raise ValueError(f"reduction must be one of {reductions}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not (math.isfinite(z_loss) and z_loss >= 0.0):
        raise ValueError(f"z_loss must be finite and >= 0, got {z_loss}")
