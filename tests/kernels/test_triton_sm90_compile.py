"""The Triton kernels that the interpreter tests compile for a real GPU (sm_90), without one."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("sm90_compile_check.py")
EXPECTED = {"_ce_forward_partials_kernel", "_ce_forward_combine_kernel", "_ce_backward_atomic_kernel",
            "_ce_backward_dhidden_kernel", "_ce_backward_dweight_kernel", "_gather_linear_gelu_kernel",
            "_gather_linear_weight_grad_kernel", "_linear_input_grad_kernel", "_layer_norm_forward_kernel",
            "_gelu_layer_norm_backward_kernel", "_segment_scatter_kernel", "attention_forward_kernel",
            "attention_backward_delta_kernel", "attention_backward_dkdv_kernel", "attention_backward_dq_kernel"}


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(SCRIPT.parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"compilation failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    compiled = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("compiled ")}
    assert EXPECTED <= compiled, f"not compiled: {sorted(EXPECTED - compiled)}"
