"""Access to the compiled module `fastmlm._C` for the kernel adapters.

`fastmlm._C` (sources in csrc/) carries no PyTorch headers: its functions take
raw addresses, sizes and strides in elements, dtype tags and a CUDA stream
handle. This module loads it lazily (importing fastmlm never fails because of
it), says why it is missing, and turns tensors into those raw arguments.

A build without the extension (`FASTMLM_BUILD_EXT=0`, or a failed load) is
legal: every op then runs another backend, and `load_error()` says why.
"""
from __future__ import annotations

import importlib
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


def require(device_type: str) -> ModuleType:
    """`fastmlm._C` if it can run kernels for this device type, else RuntimeError saying why."""
    reason = unavailable_reason(device_type)
    if reason is not None:
        raise RuntimeError(reason)
    return module()


def unavailable_reason(device_type: str) -> Optional[str]:
    """Why `fastmlm._C` cannot serve tensors of this device type, or None."""
    error = load_error()
    if error is not None:
        return error
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        if not has_cuda_kernels():
            return ("fastmlm._C was built without CUDA kernels (nvcc not found at build time, or FASTMLM_CUDA=0); "
                    "rebuild with nvcc on PATH")
        return None
    return f"fastmlm._C has no kernels for {device_type} tensors"
