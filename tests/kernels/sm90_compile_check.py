"""Compile (without running) fastmlm's Triton kernels for sm_90, at the configs a GPU gets.

Triton's interpreter runs kernels as Python and so accepts code the compiler
rejects (it let a plain float global reach a kernel, which only compiles as a
tl.constexpr), and it cannot show what a launch would need. This script drives
the real compiler down to a cubin for an H100/H200 target on a machine without
a GPU: a stand-in driver reports the target, the wrappers are told the tensors
are on a 132-SM CUDA device so they pick their GPU configs, and compiled
kernels are not loaded or launched. Run in a fresh process without
TRITON_INTERPRET (tests/kernels/test_triton_sm90_compile.py).

Prints one line per compiled kernel specialisation:
    compiled <name> <dtypes> shared=<bytes> atomics=<n> ordered_atomics=<n> head_offsets_i32=<n>
             wide_rows=<0|1> tile_offsets_i32=<n> stack=<bytes or ?>
shared: the dynamic shared memory a launch asks for; atomics: atomic adds in
the PTX, ordered_atomics those that are not relaxed (Triton's default acq_rel
puts a GPU-wide fence and a cache invalidate around each); head_offsets_i32:
head index x stride products left in int32 (they wrap for head-major views of
over 2**31 elements); wide_rows: the attention variant with int64 row offsets
(offsets.py), tile_offsets_i32: [rows x 1] index x stride products in int32
(none in that variant); stack: per-thread
local memory from the bundled cuobjdump, non-zero when registers spill.
Exits non-zero on a compile error.
"""
import os
import re
import subprocess
import sys
import tempfile
import types

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import compiler  # noqa: E402
from triton.runtime import driver  # noqa: E402

compiled = {}  # (name, hash) -> CompiledKernel


class TargetOnlyDriver:
    """Enough of a CUDA driver for JITFunction.run to compile for sm_90."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_device_interface(self):
        return torch.cuda

    def get_active_torch_device(self):
        return torch.device("cpu")


def _record(kernel):
    return lambda *args, **kwargs: compiled.setdefault((kernel.name, kernel.hash), kernel)


driver.set_active(TargetOnlyDriver())
compiler.CompiledKernel._init_handles = lambda self: None
compiler.CompiledKernel.launch_metadata = lambda self, *args, **kwargs: None
compiler.CompiledKernel.run = property(_record)

import fastmlm.kernels.triton.attention as attention  # noqa: E402
import fastmlm.kernels.triton.cross_entropy as ce  # noqa: E402
import fastmlm.kernels.triton.matmul_gather as matmul_gather  # noqa: E402
import fastmlm.kernels.triton.mlm_head as head  # noqa: E402

# CPU tensors stand in for CUDA ones: the device gates pass, and every choice
# the wrappers make from the device is made for an H100/H200 (132 SMs).
SM90_GPU = types.SimpleNamespace(type="cuda", index=0)
ce._check_device = lambda device: None
ce._sm_count = lambda device: 132
_resolve_config = ce.resolve_config
ce.resolve_config = lambda M, V, H, dtype, device, config=None: _resolve_config(M, V, H, dtype, SM90_GPU, config)
_blocks = matmul_gather._blocks
matmul_gather._blocks = lambda device, **kwargs: _blocks(SM90_GPU, **kwargs)
attention._check_device = lambda tensor, name: None  # its GPU configs apply outside the interpreter


def compile_head_and_cross_entropy(N, M, V, H, dtype):
    """Every cross-entropy and MLM-head kernel for M of N rows, vocabulary V, hidden size H."""
    hidden = torch.randn(M, H).to(dtype)
    weight, bias = torch.randn(V, H).to(dtype), torch.randn(V).to(dtype)
    targets = torch.randint(0, V, (M,))
    _, lse = ce.cross_entropy_forward(hidden, weight, bias, targets, ignore_index=-100, label_smoothing=0.1,
                                      z_loss=1e-4)
    for deterministic in (False, True):
        ce.cross_entropy_backward(torch.ones(M), hidden, weight, bias, targets, lse, ignore_index=-100,
                                  label_smoothing=0.1, z_loss=1e-4, deterministic=deterministic)
    hidden_all, index = torch.randn(N, H).to(dtype), torch.randperm(N)[:M]
    dense_w, dense_b = torch.randn(H, H).to(dtype), torch.randn(H).to(dtype)
    norm_w, norm_b = torch.ones(H).to(dtype), torch.zeros(H).to(dtype)
    row_loss, lse, pre, act, normed, mean, rstd = head.mlm_head_forward(
        hidden_all, index, dense_w, dense_b, norm_w, norm_b, weight, bias, targets, layer_norm_eps=1e-12,
        ignore_index=-100, label_smoothing=0.0, z_loss=0.0)
    for deterministic in (False, True):
        head.mlm_head_backward(torch.ones(M), hidden_all, index, dense_w, norm_w, weight, bias, targets, pre, act,
                               normed, mean, rstd, lse, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                               deterministic=deterministic)


# M = 40 rows: not a multiple of 16, the specialisation most calls get.
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    compile_head_and_cross_entropy(256, 40, 1000, 64, dtype)
# BERT-base sizes in the training dtype: at V = 1000 each vocabulary split is one block, which
# Triton specialises to a constant (the loop over several blocks is never compiled), and
# LayerNorm rows of 64; here the splits loop and the LayerNorm row is 1024 wide.
compile_head_and_cross_entropy(4096, 600, 30522, 768, torch.bfloat16)

# Attention: the specialisations a BERT run meets (head dims 32/64/128, causal, dropout).
for dtype, dim, causal, dropout_p in [(torch.bfloat16, 64, c, p) for c in (False, True) for p in (0.0, 0.1)] + [
        (torch.bfloat16, 32, False, 0.0), (torch.bfloat16, 128, True, 0.1), (torch.float16, 64, False, 0.1),
        (torch.float32, 64, True, 0.0)]:
    cu = torch.tensor([0, 100, 160], dtype=torch.int32)
    q, k, v = (torch.randn(160, 2, dim).to(dtype) for _ in range(3))
    seed = torch.tensor(7, dtype=torch.int64)
    out, lse = attention.attention_forward(q, k, v, cu, cu, 100, 100, causal=causal, softmax_scale=dim ** -0.5,
                                           dropout_p=dropout_p, seed=seed)
    attention.attention_backward(torch.randn_like(q), q, k, v, out, lse, cu, cu, 100, 100, causal=causal,
                                 softmax_scale=dim ** -0.5, dropout_p=dropout_p, seed=seed)

# The variant compiled for sequences whose row offsets pass 2**31 (forced here on small ones).
_offsets_need_int64 = attention.offsets_need_int64
attention.offsets_need_int64 = lambda terms: True
out, lse = attention.attention_forward(q, k, v, cu, cu, 100, 100, causal=True, softmax_scale=0.125, dropout_p=0.1,
                                       seed=seed)
attention.attention_backward(torch.randn_like(q), q, k, v, out, lse, cu, cu, 100, 100, causal=True,
                             softmax_scale=0.125, dropout_p=0.1, seed=seed)
attention.offsets_need_int64 = _offsets_need_int64

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def stack_bytes(kernel) -> str:
    """Per-thread stack (spilled registers live there) of the cubin, or '?' without cuobjdump."""
    if not os.access(CUOBJDUMP, os.X_OK):
        return "?"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", cubin.name], capture_output=True, text=True)
    found = re.search(r"STACK:(\d+)", usage.stdout)
    return found.group(1) if found else "?"


for (name, _), kernel in sorted(compiled.items(), key=lambda item: item[0]):
    dtypes = ",".join(sorted({t for t in kernel.src.signature.values() if t.startswith("*")})) or "-"
    atomics = re.findall(r"\b(?:atom|red)\.[\w.]+", kernel.asm["ptx"])
    ordered = [op for op in atomics if ".relaxed." not in op]
    head_offsets_i32 = re.findall(r"arith\.muli %head\w*, %stride\w* : i32", kernel.asm["ttir"])
    # Tile offsets times a runtime stride, computed in int32 (the WIDE_ROWS variant has none).
    tile_offsets_i32 = re.findall(r"arith\.muli %\w+, %\w+ : tensor<\d+x1xi32>", kernel.asm["ttir"])
    constants = {kernel.src.fn.arg_names[key[0]]: value for key, value in kernel.src.constants.items()}
    print(f"compiled {name} {dtypes} shared={kernel.metadata.shared} atomics={len(atomics)} "
          f"ordered_atomics={len(ordered)} head_offsets_i32={len(head_offsets_i32)} "
          f"wide_rows={int(bool(constants.get('WIDE_ROWS')))} tile_offsets_i32={len(tile_offsets_i32)} "
          f"stack={stack_bytes(kernel)}")
sys.exit(0 if compiled else 1)
