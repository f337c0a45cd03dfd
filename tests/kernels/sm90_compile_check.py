"""Compile (without running) fastmlm's Triton kernels for sm_90.

Triton's interpreter runs kernels as Python and so accepts code the compiler
rejects (it let a plain float global reach a kernel, which only compiles as a
tl.constexpr). This script drives the real compiler down to a cubin for an
H100/H200 target on a machine without a GPU: a stand-in driver reports the
target, and compiled kernels are not loaded or launched. Run in a fresh
process without TRITON_INTERPRET (tests/kernels/test_triton_sm90_compile.py).
Prints one line per compiled kernel and exits non-zero on a compile error.
"""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import compiler  # noqa: E402
from triton.runtime import driver  # noqa: E402

compiled = set()


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


driver.set_active(TargetOnlyDriver())
compiler.CompiledKernel._init_handles = lambda self: None
compiler.CompiledKernel.launch_metadata = lambda self, *args, **kwargs: None
compiler.CompiledKernel.run = property(lambda self: (lambda *args, **kwargs: compiled.add(self.name)))

import fastmlm.kernels.triton.attention as attention  # noqa: E402
import fastmlm.kernels.triton.cross_entropy as ce  # noqa: E402
import fastmlm.kernels.triton.matmul_gather as matmul_gather  # noqa: E402
import fastmlm.kernels.triton.mlm_head as head  # noqa: E402

# The wrappers accept CPU tensors only for the interpreter; the kernels get the
# block sizes a GPU would use, given explicitly.
ce._INTERPRET = True
attention._check_device = lambda tensor, name: None  # its default GPU configs apply
matmul_gather._blocks = lambda device, *, big=64: dict(BLOCK_M=big, BLOCK_N=big, BLOCK_K=32, num_warps=4,
                                                       num_stages=3)
GPU_CONFIG = dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, VOCAB_SPLITS=4, num_warps=8, num_stages=3)
N, M, V, H = 256, 40, 1000, 64

for dtype in (torch.bfloat16, torch.float16, torch.float32):
    hidden = torch.randn(M, H).to(dtype)
    weight, bias = torch.randn(V, H).to(dtype), torch.randn(V).to(dtype)
    targets = torch.randint(0, V, (M,))
    _, lse = ce.cross_entropy_forward(hidden, weight, bias, targets, ignore_index=-100, label_smoothing=0.1,
                                      z_loss=1e-4, config=GPU_CONFIG)
    for deterministic in (False, True):
        ce.cross_entropy_backward(torch.ones(M), hidden, weight, bias, targets, lse, ignore_index=-100,
                                  label_smoothing=0.1, z_loss=1e-4, deterministic=deterministic, config=GPU_CONFIG)
    hidden_all, index = torch.randn(N, H).to(dtype), torch.randperm(N)[:M]
    dense_w, dense_b = torch.randn(H, H).to(dtype), torch.randn(H).to(dtype)
    norm_w, norm_b = torch.ones(H).to(dtype), torch.zeros(H).to(dtype)
    row_loss, lse, pre, act, normed, mean, rstd = head.mlm_head_forward(
        hidden_all, index, dense_w, dense_b, norm_w, norm_b, weight, bias, targets, layer_norm_eps=1e-12,
        ignore_index=-100, label_smoothing=0.0, z_loss=0.0, config=GPU_CONFIG)
    for deterministic in (False, True):
        head.mlm_head_backward(torch.ones(M), hidden_all, index, dense_w, norm_w, weight, bias, targets, pre, act,
                               normed, mean, rstd, lse, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                               deterministic=deterministic, config=GPU_CONFIG)

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

for name in sorted(compiled):
    print("compiled", name)
sys.exit(0 if compiled else 1)
