"""Access to the compiled module `fastmlm._C` for the kernel adapters.

`fastmlm._C` (sources in csrc/) carries no PyTorch headers: its functions take
raw addresses, sizes and strides in elements, dtype tags and a CUDA stream
handle. This module loads it lazily (importing fastmlm never fails because of
it), says why it is missing, and turns tensors into those raw arguments.

A build without the extension (`FASTMLM_BUILD_EXT=0`, or a failed load) is
legal: every op then runs another backend, and `load_error()` says why.
"""
from __future__ import annotations

import functools
import importlib
import re
from types import ModuleType
from typing import Optional

import torch

# Must match csrc/common/dtype.h (DtypeTag).
_DTYPE_TAGS = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.int32: 3,
    torch.int64: 4,
    torch.bool: 5,
    torch.uint8: 6,
    torch.int8: 7,
}

_module: Optional[ModuleType] = None
_error: Optional[str] = None
_loaded = False


def _load() -> None:
    global _module, _error, _loaded
    if _loaded:
        return
    _loaded = True
    try:
        _module = importlib.import_module("fastmlm._C")
    except ImportError as exc:
        if getattr(exc, "name", None) == "fastmlm._C":
            _error = ("fastmlm._C is not built (installed with FASTMLM_BUILD_EXT=0, or not compiled in place: "
                      "run `pip install -e .` or `python setup.py build_ext --inplace`)")
        else:
            _error = f"fastmlm._C failed to load: {exc}"
    except Exception as exc:  # a broken binary can raise anything at import
        _error = f"fastmlm._C failed to load: {type(exc).__name__}: {exc}"


def load_error() -> Optional[str]:
    """Why `fastmlm._C` is unusable, or None when it loaded."""
    _load()
    return _error


def module() -> ModuleType:
    """The loaded `fastmlm._C`; RuntimeError with the reason if it is unusable."""
    _load()
    if _module is None:
        raise RuntimeError(_error)
    return _module


def has_cuda_kernels() -> bool:
    """True when `fastmlm._C` loaded and was compiled with its CUDA kernels."""
    _load()
    return _module is not None and bool(_module.with_cuda)


def cuda_device_count() -> int:
    """Devices the module's own CUDA runtime sees; RuntimeError (CUDA error code and text) if it cannot."""
    return module().cuda_device_count()


def dtype_tag(tensor: torch.Tensor) -> int:
    """The csrc/common/dtype.h tag of the tensor's dtype; TypeError for dtypes _C does not take."""
    tag = _DTYPE_TAGS.get(tensor.dtype)
    if tag is None:
        supported = ", ".join(str(d).replace("torch.", "") for d in _DTYPE_TAGS)
        raise TypeError(f"fastmlm._C does not take dtype {tensor.dtype}; supported: {supported}")
    return tag


def data_ptr(tensor: Optional[torch.Tensor]) -> int:
    """Address of the tensor's first element (0 for None or an empty tensor, never dereferenced then)."""
    if tensor is None or tensor.numel() == 0:
        return 0
    return tensor.data_ptr()


def device_index(tensor: torch.Tensor) -> int:
    """-1 for CPU tensors (the CPU kernels), else the CUDA device index."""
    if tensor.device.type == "cpu":
        return -1
    if tensor.device.type == "cuda":
        return tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    raise ValueError(f"fastmlm._C has no kernels for {tensor.device.type} tensors")


def stream_handle(tensor: torch.Tensor) -> int:
    """Raw cudaStream_t of torch's current stream on the tensor's device (0 for CPU tensors)."""
    if tensor.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(tensor.device).cuda_stream


def launch_args(tensor: torch.Tensor) -> dict:
    """The `device` and `stream` keyword arguments every _C entry point takes."""
    return {"device": device_index(tensor), "stream": stream_handle(tensor)}


def require(device: torch.device) -> ModuleType:
    """`fastmlm._C` if it can run kernels on tensors of this device, else RuntimeError saying why."""
    reason = unavailable_reason(device.type, device if device.type == "cuda" else None)
    if reason is not None:
        raise RuntimeError(reason)
    return module()


def unavailable_reason(device_type: str, device: Optional[torch.device] = None) -> Optional[str]:
    """Why `fastmlm._C` cannot serve tensors of this device type, or None.

    For CUDA, `device` is the GPU the call's tensors are on (None: the current
    one): a module built for other architectures, or a driver older than the
    CUDA runtime it links or the PTX it carries, fails every launch, so such a
    GPU is refused here and the op falls back to another backend. Checked in
    order of cost: the runtime (once), the recorded architectures against the
    GPU's capability (says which build would run), then loading the code on
    that GPU (once per GPU).
    """
    error = load_error()
    if error is not None:
        return error
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        if not has_cuda_kernels():
            return ("fastmlm._C was built without CUDA kernels (nvcc not found at build time, or FASTMLM_CUDA=0); "
                    "rebuild with nvcc on PATH")
        return _cuda_runtime_reason() or _architecture_reason(device) or _kernel_image_reason(_index(device))
    return f"fastmlm._C has no kernels for {device_type} tensors"


def _index(device: Optional[torch.device]) -> int:
    if device is None or device.index is None:
        return torch.cuda.current_device()
    return device.index


@functools.cache
def _cuda_runtime_reason() -> Optional[str]:
    """Whether the CUDA runtime linked into fastmlm._C works on this machine (asked once)."""
    try:
        count = cuda_device_count()
    except RuntimeError as exc:  # e.g. cudaErrorInsufficientDriver: the driver is older than the runtime
        return f"fastmlm._C's CUDA runtime cannot use this machine's GPUs ({exc})"
    if count == 0:
        return "fastmlm._C's CUDA runtime sees no GPU"
    return None


def cuda_architectures() -> tuple[str, ...]:
    """CMake CUDA_ARCHITECTURES entries `fastmlm._C` was built for, e.g. ("80-real", "90"); () if unknown."""
    value = getattr(module(), "cuda_architectures", "") if has_cuda_kernels() else ""
    return tuple(entry for entry in value.split(",") if entry)


def architecture_runs(entry: str, capability: tuple[int, int]) -> Optional[bool]:
    """Whether code built for one CUDA_ARCHITECTURES entry runs on a GPU of `capability`.

    Machine code ("80-real") runs on the same major version from its minor up
    (sm_80 on 8.6 and 8.9); PTX ("80-virtual", or the PTX half of a plain "90")
    is JIT-compiled for any later GPU; arch-specific code ("90a") runs on that
    GPU only and family code ("100f") on its major version. None for entries
    that name no architecture ("native", "all").
    """
    match = re.fullmatch(r"(\d+)(\d)([af]?)(?:-(real|virtual))?", entry)
    if match is None:
        return None
    major, minor, suffix, kind = int(match[1]), int(match[2]), match[3], match[4]
    capability = tuple(capability)
    if suffix == "a":
        return capability == (major, minor)
    same_major = capability[0] == major and capability[1] >= minor
    if suffix == "f" or kind == "real":
        return same_major
    return capability >= (major, minor)  # PTX: "-virtual", or the PTX a plain entry includes


def _architecture_reason(device: Optional[torch.device]) -> Optional[str]:
    architectures = cuda_architectures()
    if not architectures:
        return None  # a build that does not record them: loading its code tells
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return _capability_reason(architectures, tuple(torch.cuda.get_device_capability(device)))


def kernel_image(device_index: int) -> tuple[int, int]:
    """(binary_version, ptx_version) of `fastmlm._C`'s CUDA code as loaded for one GPU, e.g. (90, 90).

    Loads the code without launching anything; RuntimeError with the CUDA
    error when it cannot run on that GPU.
    """
    return tuple(module().cuda_kernel_image(device_index))


@functools.cache  # one load per GPU and process
def _kernel_image_reason(device_index: int) -> Optional[str]:
    """Whether the module's CUDA code loads on this GPU.

    The architecture rule above cannot see everything a launch depends on: a
    driver older than the compiler that made the PTX fails to JIT it
    (cudaErrorUnsupportedPtxVersion), and an entry the rule cannot judge
    ("native") may not cover this GPU. Loading the code once answers for all
    of them.
    """
    try:
        kernel_image(device_index)
    except RuntimeError as exc:
        return f"fastmlm._C's CUDA kernels cannot load on cuda:{device_index} ({exc})"
    return None


@functools.cache  # asked on every op call that could take the cuda backend
def _capability_reason(architectures: tuple[str, ...], capability: tuple[int, int]) -> Optional[str]:
    if any(architecture_runs(entry, capability) is not False for entry in architectures):
        return None
    version = ".".join(map(str, capability))
    return (f"fastmlm._C has CUDA code for {', '.join(architectures)}, none of which runs on this GPU "
            f"(compute capability {version}); rebuild with FASTMLM_CUDA_ARCHS={version}")
