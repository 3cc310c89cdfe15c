#!/usr/bin/env bash
# One device call: the GPU test suite (every @pytest.mark.gpu test), then the quantized-decode benchmark.
# From the repo root on the GPU machine, carrying .whl and .devkernels (../shared/GPU.md):
#   OUT=$OUT bash benchmarks/gpu_session.sh [tests] [quant] [int4] [moe]
set -uo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
source benchmarks/device_env.sh
parts=" ${*:-tests quant} "
want() { [[ $parts == *" $1 "* ]]; }
if want tests; then
  timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu \
    ${GPU_TESTS:-tests} 2>&1 | tail -25 | tee "$OUT/gpu_tests.log"
fi
if want quant; then
  timeout ${QUANT_TIMEOUT:-240} python3 benchmarks/gpu_quant.py --shape llama-8b --out "$OUT/gpu_quant.json" 2>&1 \
    | grep -v Warning | tail -20 | tee "$OUT/gpu_quant.log"
fi
if want int4; then
  timeout ${INT4_TIMEOUT:-150} python3 benchmarks/gpu_int4.py decode --out "$OUT/gpu_int4_decode.json" 2>&1 \
    | grep -v Warning | tail -14 | tee "$OUT/gpu_int4.log"
fi
if want moe; then
  timeout ${MOE_TIMEOUT:-120} python3 benchmarks/gpu_moe.py --out "$OUT/gpu_moe.json" 2>&1 | tail -12 | tee "$OUT/gpu_moe.log"
fi
exit 0
