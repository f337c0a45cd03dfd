#!/usr/bin/env bash
# One GPU session's checks, in priority order: what has never been measured or run on a GPU
# first. Run from the repository root on the GPU machine, within one call of at most 10 min:
#   OUT=/some/dir bash benchmarks/gpu_check.sh            (device tool: carry [".wheels"])
# DEADLINE (seconds, default 540) bounds the whole script: each stage gets what is left of it,
# up to its own bound, and a stage with under 20 s left is skipped, so the script ends on its
# own with its log complete. Everything printed also lands in $OUT/gpu_check.log; each
# benchmark's JSON and each build log go to $RESULTS, which is re-archived into
# $OUT/results.tar at every stage (the device tool brings back at most 8 files from $OUT), so a
# cut run still brings back what finished.
# STAGES (default: all) names the stages to run after the build, e.g. STAGES="training_step attention"
# for a second call: head kernels head_large kernel_benchmarks gpu_tests model training_step attention.
# The Liger-Kernel and Cut Cross-Entropy wheels (pure Python; the GPU machine has no network)
# go in the gitignored .wheels/ beforehand:
#   pip download --no-deps -d .wheels liger-kernel cut-cross-entropy
set -u
OUT=${OUT:-/tmp/fastmlm-gpu}
DEADLINE=${DEADLINE:-540}
ALL_STAGES="head kernels head_large kernel_benchmarks gpu_tests model training_step attention"
STAGES=${STAGES:-}
STAGES=${STAGES//,/ }
read -ra names <<< "$STAGES"  # no globbing of the names
for name in "${names[@]}"; do  # a misspelt stage would spend a whole call on the build alone
  [[ " $ALL_STAGES " == *" $name "* ]] || { echo "unknown stage '$name' in STAGES (known: $ALL_STAGES)"; exit 2; }
done
RESULTS=$(mktemp -d)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export FASTMLM_CUDA=1 FASTMLM_CUDA_ARCHS=${FASTMLM_CUDA_ARCHS:-90} PYTHONDONTWRITEBYTECODE=1
start=$(date +%s)
PYTEST=(python -m pytest -q -rs -o addopts="" -p no:cacheprovider)

# Written aside and renamed: a kill while tar runs leaves the previous archive whole.
keep() { tar -cf "$OUT/results.tar.part" -C "$RESULTS" . 2>/dev/null && mv "$OUT/results.tar.part" "$OUT/results.tar" \
  || echo "WARNING: could not archive $RESULTS"; }
# stage KEY TITLE: announce a stage; false (skip it) when STAGES is set and does not name KEY.
stage() {
  keep
  if [[ -n "${STAGES:-}" && " $STAGES " != *" $1 "* ]]; then echo; echo "=== $2: not in STAGES"; return 1; fi
  echo; echo "=== $2 ($(( $(date +%s) - start )) s in)"
}
# run BOUND CMD...: CMD under a timeout of min(BOUND, time left before DEADLINE - 10 s).
run() {
  local bound=$1; shift
  local left=$(( DEADLINE - 10 - ($(date +%s) - start) ))
  if (( left < 20 )); then echo "skipped: ${left} s left of DEADLINE=${DEADLINE}"; return 0; fi
  timeout $(( bound < left ? bound : left )) "$@" || echo "(exit $?)"
}

# The build always runs: every call gets a bare machine.
echo "=== build (pip install -e ., CUDA kernels for sm_${FASTMLM_CUDA_ARCHS})"
if ! run 240 pip install --no-build-isolation --no-deps -e . > "$RESULTS/build.log" 2>&1 \
    || ! python -c "import fastmlm._C" 2>/dev/null; then
  tail -30 "$RESULTS/build.log"
  echo "CUDA build failed: building without the CUDA kernels, so the Triton stages still run"
  FASTMLM_CUDA=auto run 120 pip install --no-build-isolation --no-deps -e . > "$RESULTS/build-cpu.log" 2>&1 \
    || tail -30 "$RESULTS/build-cpu.log"
fi
if ls .wheels/*.whl > /dev/null 2>&1; then
  pip install --no-deps .wheels/*.whl > "$RESULTS/wheels.log" 2>&1 || { echo "WARNING: wheels did not install:"; tail -5 "$RESULTS/wheels.log"; }
else
  echo "WARNING: no .wheels/ (carry it): the liger and cce variants will be skipped"
fi
python -c "import transformers, pytest_benchmark" || echo "WARNING: transformers or pytest-benchmark missing"
python -m fastmlm info

# head_summary JSON: one line per MLM-head benchmark in a pytest-benchmark JSON file.
head_summary() {
  python - "$1" <<'PY' 2>/dev/null || echo "$(basename "$1" .json): no result"
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    e = b["extra_info"]
    errors = " ".join(f"{k[6:]}={v:.1e}" for k, v in e.items() if k.startswith("error_"))
    print(f'{e["variant"]:>22} [{e["backend"]}] {b["stats"]["median"] * 1e3:8.3f} ms  '
          f'extra {e["extra_memory_bytes"] / 2**20:7.1f} MiB  transient {e["transient_memory_bytes"] / 2**20:7.1f} MiB'
          f'  rows {e["masked_rows"]}  errors {errors}')
PY
}

if stage head "sparse MLM head vs HuggingFace, Liger-Kernel, Cut Cross-Entropy (one pytest per variant)"; then
  for variant in fastmlm hf_dense hf_gathered liger cce fastmlm_deterministic; do
    run 75 "${PYTEST[@]}" "benchmarks/test_mlm_head.py::test_mlm_head_forward_backward[$variant]" --benchmark-only \
      --benchmark-json="$RESULTS/mlm_head_$variant.json" 2>&1 | grep -E "passed|failed|skipped|Error|error" | tail -3
    head_summary "$RESULTS/mlm_head_$variant.json"
    keep
  done
fi

if stage kernels "kernels never run on a GPU before (Triton and CUDA cross-entropy, MLM head)"; then
  run 180 "${PYTEST[@]}" -x tests/kernels/test_triton_cross_entropy.py tests/kernels/test_triton_mlm_head.py \
    tests/kernels/test_compiled_cross_entropy.py tests/kernels/test_compiled_mlm_head.py 2>&1 | tail -15
fi

if stage head_large "MLM head at 64 x 512 tokens (~4900 rows): atomic against deterministic backward"; then
  run 90 "${PYTEST[@]}" benchmarks/test_mlm_head.py -k large_batch --benchmark-only \
    --benchmark-json="$RESULTS/mlm_head_large.json" 2>&1 | grep -E "passed|failed|skipped|Error|error" | tail -3
  head_summary "$RESULTS/mlm_head_large.json"
fi

if stage kernel_benchmarks "streamed CUDA cross-entropy, masking and gather benchmarks"; then
  run 75 "${PYTEST[@]}" benchmarks/test_cross_entropy.py benchmarks/test_masking.py benchmarks/test_gather.py \
    --benchmark-only -k cuda --benchmark-json="$RESULTS/kernels.json" --benchmark-columns=median,rounds 2>&1 \
    | grep -E "test_|passed|failed"
fi

if stage gpu_tests "GPU tests of the compiled kernels and the cross-entropy / head backends on CUDA tensors"; then
  run 120 "${PYTEST[@]}" tests/gpu tests/ops/test_backends.py tests/ops/test_dispatch.py \
    -k "cuda and (gpu or cross_entropy or mlm_head or kernel or dispatch)" 2>&1 | tail -8
fi

if stage model "model on the GPU (parity, CUDA graphs with attention dropout, training)"; then
  run 120 "${PYTEST[@]}" tests/model tests/train -k "cuda or gpu or graph" 2>&1 | tail -8
fi

if stage training_step "whole training step: fastmlm and patch_hf against HuggingFace (BERT-base, bf16 autocast)"; then
  run 150 "${PYTEST[@]}" benchmarks/test_training_step.py --benchmark-only --benchmark-json="$RESULTS/training_step.json" \
    --benchmark-columns=median,rounds 2>&1 | grep -E "test_|passed|failed|Error|exit|skipped:"
  python - "$RESULTS/training_step.json" <<'PY' 2>/dev/null || echo "training step: no result"
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    e = b["extra_info"]
    errors = " ".join(f"{k[6:]}={v:.1e}" if isinstance(v, float) else f"{k[6:]}={v}"
                      for k, v in e.items() if k.startswith("error_"))
    print(f'{e["variant"]:>20} {b["stats"]["median"] * 1e3:8.2f} ms  {e["real_tokens_per_second"]:10.0f} real tokens/s  '
          f'peak {e["peak_memory_bytes"] / 2**20:8.1f} MiB  tokens {e["real_tokens"]}/{e["padded_tokens"]}  errors {errors}')
PY
fi

if stage attention "attention re-measured (SDPA baselines now without .grad accumulation)"; then
  run 75 "${PYTEST[@]}" benchmarks/test_attention.py --benchmark-only -k "not sweep" \
    --benchmark-json="$RESULTS/attention.json" --benchmark-columns=median,rounds 2>&1 | grep -E "test_|passed|failed"
fi

keep
echo "done in $(( $(date +%s) - start )) s"
