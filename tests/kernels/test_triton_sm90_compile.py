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


# sm_90's largest shared memory per block (227 KiB, with the opt-in Triton's loader makes).
SM90_SHARED_LIMIT = 232448


def _parse(line):
    _, name, dtypes, *fields = line.split()
    return name, dtypes, dict(field.split("=") for field in fields)


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90_within_its_limits():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(SCRIPT.parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"compilation failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    kernels = [_parse(line) for line in done.stdout.splitlines() if line.startswith("compiled ")]
    assert EXPECTED <= {name for name, _, _ in kernels}, f"not compiled: {sorted(EXPECTED - {k[0] for k in kernels})}"
    # A launch asking for more shared memory than an H100/H200 block has fails at run time only.
    too_big = [(name, dtypes, f["shared"]) for name, dtypes, f in kernels if int(f["shared"]) > SM90_SHARED_LIMIT]
    assert not too_big, too_big
    # The gradient scatters' atomic adds are relaxed: nothing reads them until a later kernel.
    assert any(int(f["atomics"]) for name, _, f in kernels if name == "_ce_backward_atomic_kernel")
    ordered = [(name, dtypes) for name, dtypes, f in kernels if int(f["ordered_atomics"])]
    assert not ordered, f"acq_rel atomics (a GPU-wide fence per add): {ordered}"
    # head * stride in int32 wraps once a head-major q/k/v view spans 2**31 elements.
    wrapping = [(name, dtypes) for name, dtypes, f in kernels if int(f["head_offsets_i32"])]
    assert not wrapping, f"int32 head offsets: {wrapping}"
    # The variant for sequences whose row x stride passes 2**31 has every row offset in int64.
    wide = {name: int(f["tile_offsets_i32"]) for name, _, f in kernels if f["wide_rows"] == "1"}
    assert set(wide) == {"attention_forward_kernel", "attention_backward_dkdv_kernel",
                         "attention_backward_dq_kernel"} and not any(wide.values()), wide
    # The MLM head's kernels at their bf16/fp16 configs keep everything in registers
    # (_ce_backward_dweight_kernel sits at 254 of 255): a spill here is a regression.
    spilled = [(name, dtypes, f["stack"]) for name, dtypes, f in kernels
               if not name.startswith("attention") and ("bf16" in dtypes or "fp16" in dtypes)
               and f["stack"] not in ("0", "?")]
    assert not spilled, f"register spills (per-thread stack bytes): {spilled}"
