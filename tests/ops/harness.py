"""The backend harness: every backend of every op against the `torch` reference.

An `OpCase` builds fresh random inputs for one situation (edge shapes,
options, non-contiguous layouts) and calls the public op. `check_case` runs it
under a forced backend and under the reference, then compares every output
and the gradient of every floating input. While the backend runs, a
`KernelWatch` dispatch mode fills every freshly allocated tensor with poison
(NaN, or a sentinel integer) so an output element a kernel forgets to write
shows up as a mismatch, and records each aten op and allocation for the
structural checks.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch._library import custom_ops
from torch.utils._python_dispatch import TorchDispatchMode

from fastmlm.ops.dispatch import use_backend
from tests.tolerances import assert_close, assert_equal

aten = torch.ops.aten
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
POISON_INT = -0x5A5A5A5A  # fits int32; not a valid index, id or count

_FACTORIES = {
    aten.empty.memory_format,
    aten.empty_strided.default,
    aten.empty_like.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
}


@dataclass(frozen=True)
class OpCase:
    """One situation for one op family.

    build(device, dtype, generator) -> dict of inputs (tensors already at the
    dtype and layout under test); call(**inputs) -> a tensor or tuple of
    tensors from the public op. `grads` names the floating inputs whose
    gradients are checked; `exact` compares outputs bit for bit (integer ops).
    """

    family: str
    name: str
    build: Callable[..., dict]
    call: Callable[..., object]
    dtypes: tuple = FLOAT_DTYPES
    grads: tuple = ()
    exact: bool = False
    skip: Optional[Callable[[str, str, torch.dtype], Optional[str]]] = field(default=None)

    @property
    def id(self) -> str:
        return f"{self.family}-{self.name}"


class KernelWatch(TorchDispatchMode):
    """Poisons fresh allocations and records aten ops inside fastmlm's custom ops.

    A custom op reaches a dispatch mode as one call; to see inside it, the
    mode runs the op's Python implementation itself with the mode re-entered.
    """

    def __init__(self, poison: bool = True):
        super().__init__()
        self.poison = poison
        self.ops: list = []
        self.allocations: list[tuple[tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("fastmlm::"):
            with self:
                return custom_ops.OPDEFS[name]._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        self.ops.append(func)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.allocations.append((tuple(t.shape), t.dtype))
        if func in _FACTORIES and self.poison and isinstance(out, torch.Tensor):
            if out.is_floating_point():
                out.fill_(float("nan"))
            elif out.dtype in (torch.int32, torch.int64):
                out.fill_(POISON_INT)
        return out


def strided_view(t: torch.Tensor) -> torch.Tensor:
    """`t`'s values as a non-contiguous view, for the cases that check strides are honoured.

    A matrix is stored transposed (column-major); a vector is every other element of a
    buffer twice as long whose gaps hold NaN (0 for integers), so a kernel that assumes
    unit stride reads NaN, or the wrong rows, and the case fails on its output.
    """
    if t.dim() == 2:
        return t.t().contiguous().t()
    gap = float("nan") if t.is_floating_point() else 0
    buffer = torch.full((2 * t.numel(),), gap, dtype=t.dtype, device=t.device)
    buffer[::2] = t.reshape(-1)
    return buffer[::2].view(t.shape)


def case_generator(case: OpCase, device: str, dtype) -> torch.Generator:
    """Inputs differ per case, device and dtype, and are the same on every run (a failure reproduces)."""
    seed = zlib.crc32(f"{case.id}-{device}-{dtype}".encode())
    return torch.Generator(device="cpu").manual_seed(seed)


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _to_reference(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().to(torch.float64)
    return value


def _run(case: OpCase, inputs: dict, upstream: list, watch: Optional[KernelWatch]):
    """Outputs and gradients of the named inputs for sum(out_i * upstream_i)."""
    leaves = {}
    for name in case.grads:
        if inputs.get(name) is not None:
            leaves[name] = inputs[name].requires_grad_(True)
    if watch is None:
        outputs = _as_tuple(case.call(**inputs))
    else:
        with watch:
            outputs = _as_tuple(case.call(**inputs))
    grads = {}
    if leaves:
        terms = [(o.to(torch.float64) * w).sum() for o, w in zip(outputs, upstream)
                 if w is not None and o.requires_grad]
        if terms:
            if watch is None:
                values = torch.autograd.grad(sum(terms), list(leaves.values()), allow_unused=True)
            else:
                with watch:
                    values = torch.autograd.grad(sum(terms), list(leaves.values()), allow_unused=True)
            grads = {name: g for name, g in zip(leaves, values)}
    for leaf in leaves.values():
        leaf.requires_grad_(False)
    return [o.detach() for o in outputs], grads


def check_case(case: OpCase, backend: str, device: str, dtype) -> KernelWatch:
    """Assert that `backend` matches the reference on this case; returns what it ran."""
    generator = case_generator(case, device, dtype)
    inputs = case.build(device=device, dtype=dtype, generator=generator)
    reference_inputs = dict(inputs) if case.exact else {k: _to_reference(v) for k, v in inputs.items()}
    with use_backend("torch", case.family):
        # The gradient is that of sum(out_i * w_i) with fixed random weights
        # w_i shaped like the floating outputs (drawn after a first pass
        # reveals the shapes, which may depend on the data).
        shapes, _ = _run(case, reference_inputs, [], None)
        upstream = [torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.device)
                    if o.is_floating_point() else None for o in shapes]
        expected, expected_grads = _run(case, reference_inputs, upstream, None)
    watch = KernelWatch()
    with use_backend(backend, case.family):
        actual, actual_grads = _run(case, inputs, upstream, watch)

    assert len(actual) == len(expected), f"{len(actual)} outputs, reference has {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        what = f"{case.id}[{backend}, {device}, {dtype}] output {i}"
        if case.exact or not e.is_floating_point():
            assert_equal(a, e, what)
        else:
            assert_close(a, e, dtype, what)
    for name, e in expected_grads.items():
        a = actual_grads.get(name)
        what = f"{case.id}[{backend}, {device}, {dtype}] grad of {name}"
        if e is None:
            assert a is None or not a.any(), f"{what}: reference has no gradient, backend has a non-zero one"
            continue
        assert a is not None, f"{what}: backend gave no gradient"
        assert a.dtype == inputs[name].dtype, f"{what}: dtype {a.dtype}, input is {inputs[name].dtype}"
        assert_close(a, e, dtype, what)
    return watch
