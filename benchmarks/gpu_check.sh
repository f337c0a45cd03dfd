#!/usr/bin/env bash
# One GPU session's checks, in priority order, each stage bounded so that a short lease
# still returns what finished (the bounds add up to ~18 min: under a 10-minute call the
# last stages are cut, which is why they come last). Run from the repository root on the GPU machine:
#   OUT=/some/dir bash benchmarks/gpu_check.sh
# Wheels the GPU machine cannot download (liger-kernel, cut-cross-entropy: pure Python)
# go in .wheels/ beforehand: pip download --no-deps -d .wheels liger-kernel cut-cross-entropy
set -u
OUT=${OUT:-/tmp/fastmlm-gpu}
mkdir -p "$OUT"
# Everything printed also lands in $OUT: a run cut short by the lease still brings back its log.
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export FASTMLM_CUDA=1 FASTMLM_CUDA_ARCHS=${FASTMLM_CUDA_ARCHS:-90} PYTHONDONTWRITEBYTECODE=1
stage() { echo; echo "=== $1 ($(date +%T))"; }

stage build
start=$(date +%s)
pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
ls .wheels/*.whl > /dev/null 2>&1 && pip install --no-deps .wheels/*.whl > /dev/null 2>&1
python -m fastmlm info

stage "kernels never run on a GPU before (cross-entropy, MLM head)"
timeout 240 python -m pytest -x -q -o addopts="" -p no:cacheprovider \
  tests/kernels/test_triton_cross_entropy.py tests/kernels/test_triton_mlm_head.py \
  tests/kernels/test_compiled_cross_entropy.py tests/kernels/test_compiled_mlm_head.py 2>&1 | tail -15

stage "sparse MLM head against HuggingFace, Liger-Kernel and Cut Cross-Entropy"
timeout 150 python -m pytest -q -o addopts="" -p no:cacheprovider benchmarks/test_mlm_head.py --benchmark-only \
  --benchmark-json="$OUT/mlm_head.json" --benchmark-columns=median,rounds 2>&1 | grep -E "test_|passed|failed|Error"
python - "$OUT/mlm_head.json" <<'PY'
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    e = b["extra_info"]
    print(f'{e["variant"]:>24} {b["stats"]["median"] * 1e3:8.3f} ms  extra {e["extra_memory_bytes"] / 2**20:8.1f} MiB'
          f'  transient {e["transient_memory_bytes"] / 2**20:8.1f} MiB')
PY

stage "every backend against the reference on CUDA tensors"
timeout 240 python -m pytest -q -o addopts="" -p no:cacheprovider tests/ops tests/gpu -k "cuda" 2>&1 | tail -8

stage "model on the GPU (parity, CUDA graphs with attention dropout, training)"
timeout 240 python -m pytest -q -o addopts="" -p no:cacheprovider tests/model tests/train -k "cuda or gpu or graph" 2>&1 | tail -8

stage "streamed cross-entropy, masking, gather benchmarks"
timeout 120 python -m pytest -q -o addopts="" -p no:cacheprovider benchmarks/test_cross_entropy.py \
  benchmarks/test_masking.py benchmarks/test_gather.py --benchmark-only -k cuda \
  --benchmark-json="$OUT/kernels.json" --benchmark-columns=median,rounds 2>&1 | grep -E "test_|passed|failed"
