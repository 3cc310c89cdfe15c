#!/usr/bin/env bash
# Contracts v3's regression check on the GPU machine: weavelm before (a copy of the earlier commit's tree in .old/,
# made with `git archive <commit> weavelm benchmarks pyproject.toml | tar -x -C .old`) against this tree, interleaved,
# on nano-vllm's workload (benchmarks/vs_nanovllm.py, Qwen3-0.6B shape, dummy weights), then the GPU test suite.
# From the repo root there, carrying .whl, .devkernels, .old and .peer (cp ../shared/peer/make_model.py .peer/):
#   bash benchmarks/gpu_frontend_ab.sh [ab] [tests]        (logs and JSON under $OUT)
set -uo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
source benchmarks/device_env.sh
parts=" ${*:-ab tests} "
want() { [[ $parts == *" $1 "* ]]; }
python3 .peer/make_model.py /tmp/q06 > "$OUT/make_model.log" 2>&1
if want ab; then
  for round in $(seq 1 ${ROUNDS:-2}); do
    for side in old new; do
      dir=$PWD; [ "$side" = old ] && dir=$PWD/.old
      (cd "$dir" && PYTHONPATH=/tmp/site:$dir python3 benchmarks/vs_nanovllm.py --model /tmp/q06 --repeats 1 \
        --out "$OUT/frontend_${side}_${round}.json" 2>&1 | grep -v Warning | tail -5 | sed "s/^/[$side $round] /")
    done
  done
fi
want tests && timeout ${TESTS_TIMEOUT:-330} python3 -m pytest -q -p no:cacheprovider -o addopts="" \
  ${GPU_TESTS:-tests/gpu tests/test_triton_ops.py tests/test_sampling_kernel.py} 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
exit 0
