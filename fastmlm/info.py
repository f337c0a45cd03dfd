"""`fastmlm info`: what this install has and which backend each op would pick."""
from __future__ import annotations

import importlib
import os
import platform

import torch

import fastmlm


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # not installed, or broken
        return f"unavailable ({type(exc).__name__}: {exc})"


def _sample_calls():
    """(table, meta-tensor arguments of its forward op) per op family.

    Meta tensors carry shape and dtype without memory, which is all a
    backend's `why_not` reads, so the choice for CUDA tensors is shown even
    on a machine without a GPU.
    """
    from fastmlm.ops.attention import ATTENTION
    from fastmlm.ops.cross_entropy import MLM_CROSS_ENTROPY
    from fastmlm.ops.gather import GATHER_ROWS
    from fastmlm.ops.masking import MASK_TOKENS, MASKED_POSITIONS

    meta = dict(device="meta")
    ids = torch.empty(8, 128, dtype=torch.int64, **meta)
    hidden = torch.empty(150, 768, dtype=torch.bfloat16, **meta)
    weight = torch.empty(30522, 768, dtype=torch.bfloat16, **meta)
    qkv = torch.empty(1024, 12, 64, dtype=torch.bfloat16, **meta)
    cu = torch.empty(9, dtype=torch.int32, **meta)
    calls = [
        (MASK_TOKENS, (ids, None, None, 103, 30522, 0.15, 0, False)),
        (MASKED_POSITIONS, (ids, -100, 1024)),
        (GATHER_ROWS, (hidden, torch.empty(150, dtype=torch.int64, **meta))),
        (MLM_CROSS_ENTROPY, (hidden, weight, None, torch.empty(150, dtype=torch.int64, **meta), -100, 0.0, 0.0)),
        (ATTENTION, (qkv, qkv, qkv, cu, cu, 128, 128, False, 0.125, 0.0, torch.empty((), dtype=torch.int64, **meta))),
    ]
    from fastmlm.ops.mlm_head import MLM_HEAD

    rows = torch.empty(1024, 768, dtype=torch.bfloat16, **meta)
    square = torch.empty(768, 768, dtype=torch.bfloat16, **meta)
    vector = torch.empty(768, dtype=torch.bfloat16, **meta)
    calls.append((MLM_HEAD, (rows, torch.empty(150, dtype=torch.int64, **meta), square, vector, vector, vector, weight,
                             None, torch.empty(150, dtype=torch.int64, **meta), 1e-12, -100, 0.0, 0.0)))
    return calls


def _kernel_image_line(_ext) -> str:
    try:
        binary, ptx = _ext.kernel_image(torch.cuda.current_device())
    except RuntimeError as exc:
        return f"do not load ({exc})"
    return f"load as sm_{binary} machine code (from compute_{ptx})"


def report() -> str:
    from fastmlm import _ext
    from fastmlm.ops.dispatch import BackendUnavailable

    lines = [
        f"fastmlm {fastmlm.__version__} (python {platform.python_version()})",
        f"torch {torch.__version__}, triton {_version('triton')}",
    ]
    error = _ext.load_error()
    lines.append("fastmlm._C: " + ("loaded" if error is None else f"not loaded ({error})"))
    if error is None:
        built = _ext.has_cuda_kernels()
        lines.append("CUDA kernels compiled in: " + (f"yes, for {', '.join(_ext.cuda_architectures()) or '?'}"
                                                     if built else "no"))
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name()} (compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))})")
        if error is None and _ext.has_cuda_kernels():
            lines.append("CUDA kernels on this GPU: " + _kernel_image_line(_ext))
    else:
        lines.append("GPU: none visible to torch")
    forced = os.environ.get("FASTMLM_BACKEND", "").strip()
    lines.append("backend per op (bf16/int64 BERT-base shapes)"
                 + (f", FASTMLM_BACKEND={forced} forcing where it names a backend:" if forced else ":"))
    for table, args in _sample_calls():
        for device in ("cpu", "cuda"):
            try:
                chosen = table.choose(device, *args).name
            except BackendUnavailable:
                chosen = "none"
            skipped = [f"{name}: {reason}" for name, reason in table.reasons(device, *args).items()
                       if reason is not None and name != chosen]
            lines.append(f"  {table.family:<18} {device:<5} -> {chosen}")
            for reason in skipped:
                lines.append(f"  {'':<18} {'':<5}    not {reason}")
    return "\n".join(lines)
