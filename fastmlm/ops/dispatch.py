"""Backend registry: which implementation serves an op call, and why not the others.

Each op family (`attention`, `mask_tokens`, ...) owns a `BackendTable`. Every
backend answers `why_not(device_type, *args)` with a reason string or None;
the first backend without a reason, in a fixed order per device, serves the
call. Forcing a backend (the `FASTMLM_BACKEND` environment variable or the
`use_backend` context manager) skips the order; a forced backend that cannot
serve raises `BackendUnavailable` listing every backend's reason, so a user
never silently gets a different implementation than the one asked for.

`FASTMLM_BACKEND` is read at every call. Either one name (`triton`), which
forces that backend on every op that has one and leaves the others alone, or
per-family entries (`attention=sdpa,mlm_cross_entropy=torch`).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

BACKEND_NAMES = ("triton", "cuda", "cpu", "sdpa", "torch")

# Fastest first. `triton` is absent from the CPU order on purpose: on CPU
# tensors it runs only in the interpreter, which is for testing, so it serves
# them only when forced.
DEVICE_ORDER = {
    "cuda": ("triton", "cuda", "sdpa", "torch"),
    "cpu": ("cpu", "sdpa", "torch"),
}
OTHER_DEVICE_ORDER = ("torch",)

WhyNot = Callable[..., Optional[str]]


class BackendUnavailable(RuntimeError):
    """No backend (or not the forced one) can serve this call."""


@dataclass(frozen=True)
class Backend:
    """One implementation of an op family.

    `forward` and `backward` take the arguments of the family's forward and
    backward custom ops. `backward=None` means "recompute `forward` under
    autograd and differentiate it", valid only for backends written in
    differentiable PyTorch (the reference, sdpa).
    """

    name: str
    why_not: WhyNot
    forward: Callable
    backward: Optional[Callable] = None
    # Optional: forward and the gradient of `grad_scale * sum(row_loss)` in one
    # call, `forward_backward(*forward_args, grad_scale)`, for losses whose
    # upstream gradient is one scalar (see ops/summed_loss.py), used where
    # `fuses(*forward_args)` says it saves work for that input.
    forward_backward: Optional[Callable] = None
    fuses: Optional[Callable[..., bool]] = None


_local = threading.local()

# Every op family's table by name (the family name is also its custom op's
# name, `fastmlm::<family>`): the tests and `fastmlm info` enumerate these.
TABLES: dict[str, "BackendTable"] = {}


def _forced_stack() -> list[tuple[str, Optional[str]]]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


@contextlib.contextmanager
def use_backend(name: str, family: Optional[str] = None) -> Iterator[None]:
    """Force backend `name` for `family` (or for every family that has it)."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; backends are {', '.join(BACKEND_NAMES)}")
    if family is not None and family not in TABLES:
        raise ValueError(f"unknown op family {family!r}; families are {', '.join(TABLES)}")
    stack = _forced_stack()
    stack.append((name, family))
    try:
        yield
    finally:
        stack.pop()


def _env_forced(family: str, table_names: tuple[str, ...]) -> Optional[str]:
    value = os.environ.get("FASTMLM_BACKEND", "").strip()
    if not value:
        return None
    # An entry for this family wins over a bare backend name wherever each stands
    # ("torch,attention=sdpa" forces sdpa on attention, torch elsewhere).
    for_family, bare = None, None
    for entry in value.split(","):
        entry = entry.strip()
        if "=" in entry:
            fam, name = (part.strip() for part in entry.split("=", 1))
            if fam not in TABLES:  # a typo must not silently leave the default backend in place
                raise ValueError(f"FASTMLM_BACKEND names unknown op family {fam!r}; families are {', '.join(TABLES)}")
            if name not in BACKEND_NAMES:
                raise ValueError(f"FASTMLM_BACKEND names unknown backend {name!r}")
            if fam == family and for_family is None:
                for_family = name
        elif entry:
            if entry not in BACKEND_NAMES:
                raise ValueError(f"FASTMLM_BACKEND names unknown backend {entry!r}")
            if entry in table_names and bare is None:
                bare = entry
    return for_family or bare


class BackendTable:
    """The backends of one op family, in registration order."""

    def __init__(self, family: str):
        self.family = family
        self.backends: dict[str, Backend] = {}
        TABLES[family] = self

    def register(self, backend: Backend) -> Backend:
        if backend.name not in BACKEND_NAMES:
            raise ValueError(f"unknown backend name {backend.name!r}")
        self.backends[backend.name] = backend
        return backend

    def forced(self) -> Optional[str]:
        """The backend forced for this family right now, if any (innermost context wins)."""
        for name, family in reversed(_forced_stack()):
            if family is None and name in self.backends:
                return name
            if family == self.family:
                return name
        return _env_forced(self.family, tuple(self.backends))

    def reasons(self, device_type: str, *args, **kwargs) -> dict[str, Optional[str]]:
        """Every backend's reason for not serving this call (None: it can)."""
        return {name: b.why_not(device_type, *args, **kwargs) for name, b in self.backends.items()}

    def choose(self, device_type: str, *args, **kwargs) -> Backend:
        forced = self.forced()
        if forced is not None:
            backend = self.backends.get(forced)
            reason = (
                f"{self.family} has no {forced!r} backend"
                if backend is None
                else backend.why_not(device_type, *args, **kwargs)
            )
            if reason is None:
                return backend
            raise BackendUnavailable(
                f"{self.family}: forced backend {forced!r} cannot serve this call: {reason}\n"
                + self._explain(device_type, *args, **kwargs)
            )
        for name in DEVICE_ORDER.get(device_type, OTHER_DEVICE_ORDER):
            backend = self.backends.get(name)
            if backend is not None and backend.why_not(device_type, *args, **kwargs) is None:
                return backend
        raise BackendUnavailable(f"{self.family}: no backend can serve this call\n" + self._explain(device_type, *args, **kwargs))

    def _explain(self, device_type: str, *args, **kwargs) -> str:
        lines = []
        for name, reason in self.reasons(device_type, *args, **kwargs).items():
            lines.append(f"  {name}: {reason or 'can serve'}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# Availability shared by many backends.

def call_device(device_type: str, tensor) -> Optional[torch.device]:
    """The CUDA device of a call's first tensor, which availability is judged on; None
    (the current device) for a call described without real tensors (meta, in `fastmlm info`)."""
    if device_type == "cuda" and isinstance(tensor, torch.Tensor) and tensor.device.type == "cuda":
        return tensor.device
    return None


def triton_why_not(device_type: str, device: Optional[torch.device] = None) -> Optional[str]:
    """Why Triton kernels cannot run on tensors of this device type (on `device`, for CUDA)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({exc})"
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device_type == "cpu":
        return None if interpreted else "triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1)"
    if device_type != "cuda":
        return f"triton does not run on {device_type} tensors"
    if interpreted:
        return "TRITON_INTERPRET=1 is set: the interpreter runs CPU tensors, not CUDA ones"
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"fastmlm's Triton kernels need compute capability >= 8.0, this GPU has {major}.x"
    return None


def compiled_why_not(device_type: str, kernels: str, device: Optional[torch.device] = None) -> Optional[str]:
    """Why the compiled kernels `fastmlm.kernels.compiled.<kernels>` cannot serve this device type.

    Each adapter module knows what it needs from fastmlm._C (the module
    loaded, CUDA kernels compiled in and runnable on `device`, its own entry
    points present).
    """
    if device_type not in ("cpu", "cuda"):
        return f"fastmlm._C has no kernels for {device_type} tensors"
    try:
        module = importlib.import_module(f"fastmlm.kernels.compiled.{kernels}")
    except ImportError as exc:
        return f"fastmlm.kernels.compiled.{kernels} cannot be imported ({exc})"
    return module.available(device_type, device)


def dtype_why_not(dtype: torch.dtype, allowed: tuple[torch.dtype, ...]) -> Optional[str]:
    if dtype in allowed:
        return None
    names = ", ".join(str(d).replace("torch.", "") for d in allowed)
    return f"dtype {str(dtype).replace('torch.', '')} is not one of {names}"


def recompute_backward(forward: Callable, inputs: list, needs_grad: list[bool], grad_outputs: list) -> list:
    """Gradients of `forward(*inputs)` by re-running it under autograd.

    Used by backends written in differentiable PyTorch: the backward custom op
    runs this eagerly, so torch.compile sees one opaque backward node.
    A custom op's body runs with autograd excluded from the dispatcher's
    thread-local key set (enable_grad alone records nothing there), so the
    recomputation lifts that exclusion for its own duration.
    """
    leaves = []
    for value, wanted in zip(inputs, needs_grad):
        if isinstance(value, torch.Tensor) and wanted:
            leaves.append(value.detach().requires_grad_(True))
        else:
            leaves.append(value)
    exclude = torch._C._dispatch_tls_local_exclude_set().remove(torch._C.DispatchKey.AutogradFunctionality)
    include = torch._C._dispatch_tls_local_include_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        outputs = forward(*leaves)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
        wrt = [leaf for leaf, wanted in zip(leaves, needs_grad) if wanted and isinstance(leaf, torch.Tensor)]
        if pairs and wrt:
            grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
        else:
            grads = [None] * len(wrt)
    result, it = [], iter(grads)
    for leaf, wanted in zip(leaves, needs_grad):
        if wanted and isinstance(leaf, torch.Tensor):
            grad = next(it)
            result.append(torch.zeros_like(leaf) if grad is None else grad)
        else:
            result.append(None)
    return result
