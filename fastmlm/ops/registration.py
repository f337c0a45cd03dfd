"""Autocast rules for fastmlm's custom ops.

`torch.library.register_autocast` casts to one dtype fixed at registration,
but autocast's dtype is the user's choice per region (bf16 or fp16 on CUDA,
bf16 on CPU). This registers the same kind of rule that reads the region's
dtype at call time: floating tensors on the autocast device (float64 excepted) are
cast to it, then the op runs with autocast excluded, as for
`torch.nn.functional.linear`.
"""
from __future__ import annotations

import torch

_AUTOCAST_KEYS = {"cuda": "AutocastCUDA", "cpu": "AutocastCPU"}
_lib = torch.library.Library("fastmlm", "FRAGMENT")


def _cast(value, device_type: str, dtype: torch.dtype):
    # As autocast's own rule (`is_eligible` in aten/src/ATen/autocast_mode.h): float64 is left alone.
    if (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64
            and value.device.type == device_type):
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, device_type, dtype) for v in value)
    return value


def register_autocast(op_def, device_types=("cuda", "cpu")) -> None:
    """Make `op_def` (a torch.library.custom_op) run in the autocast dtype."""
    name = op_def._name  # the op's name within the `fastmlm` namespace
    for device_type in device_types:
        key = _AUTOCAST_KEYS[device_type]
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, _device_type=device_type, _exclude=keyset):
            dtype = torch.get_autocast_dtype(_device_type)
            with torch._C._ExcludeDispatchKeyGuard(_exclude):
                return op_def._opoverload(*_cast(args, _device_type, dtype))

        _lib.impl(name, kernel, key, with_keyset=True)


def autocast_floats(device_type: str, *tensors):
    """`tensors` as the op's autocast rule will see them: floating ones on `device_type` cast
    to the region's dtype when autocast is on there (None and other tensors unchanged).

    The public functions check that their float inputs share a dtype; inside an autocast
    region fp32 weights beside a bf16 activation are normal and are unified by the rule
    anyway, so they are unified before the check.
    """
    if not torch.is_autocast_enabled(device_type):
        return tensors
    return tuple(_cast(t, device_type, torch.get_autocast_dtype(device_type)) for t in tensors)
