#!/usr/bin/env bash
# Issue 13's same-run comparison on the GPU machine: nano-vllm (the peer) and weavelm on bench.py's workload,
# profiles of both, and 8B-shape batch-1 decode against the card's copy bandwidth measured in the same run.
# From the repo root there, carrying .whl (pydantic & co., xxhash), .devkernels (FA3) and .peer (cp -r ../shared/peer .peer):
#   bash benchmarks/gpu_vs_nanovllm.sh [peer] [weavelm] [profile] [profile-peer] [decode] [tests]
#   (default: all but tests; logs and JSON under $OUT)
set -uo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
source benchmarks/device_env.sh
parts=" ${*:-peer weavelm profile profile-peer decode} "
want() { [[ $parts == *" $1 "* ]]; }
python3 .peer/make_model.py /tmp/q06 > "$OUT/make_model.log" 2>&1
export VLLM_FA3_SO_XZ=$PWD/.devkernels/_vllm_fa3_C.abi3.so.xz
# 1. the peer, bench.py verbatim plus its steady-state rerun
want peer && bash .peer/run.sh --no-check --repeat ${PEER_REPEAT:-1} --out "$OUT" 2>&1 | grep -v "^\s*$" | tail -6 | tee "$OUT/peer.log"
# 2. weavelm, default settings, same model and workload, steady state, temperature 0.6 and greedy
want weavelm && python3 benchmarks/vs_nanovllm.py --model /tmp/q06 --peer-json "$OUT/peer_nanovllm.json" \
  --repeats ${REPEATS:-2} --out "$OUT/vs_nanovllm.json" 2>&1 | grep -v Warning | tail -16 | tee "$OUT/weavelm.log"
# 3. a window of 40 steps of each engine's timed run under the torch profiler
if want profile; then
  python3 benchmarks/vs_nanovllm.py --model /tmp/q06 --profile weavelm --out "$OUT/profile_weavelm.json" \
    > "$OUT/profile_weavelm.log" 2>&1; tail -14 "$OUT/profile_weavelm.log"
fi
if want profile-peer; then
  PYTHONPATH=$PYTHONPATH:$PWD/.peer:$PWD/.peer/nano-vllm python3 benchmarks/vs_nanovllm.py --model /tmp/q06 \
    --profile nano-vllm --out "$OUT/profile_nanovllm.json" > "$OUT/profile_nanovllm.log" 2>&1
  tail -14 "$OUT/profile_nanovllm.log"
fi
# 4. the GPU test suite (parity vs transformers for every backend, eager and graphs)
want tests && python3 -m pytest -q -p no:cacheprovider -o addopts="" ${GPU_TESTS:-tests/gpu tests/test_triton_ops.py tests/test_sampling_kernel.py} 2>&1 \
  | tail -8 | tee "$OUT/gpu_tests.log"
# 5. batch-1 decode of the Llama-3.1-8B shape vs this run's copy-bandwidth roofline
want decode && python3 benchmarks/gpu_decode.py --shape llama-8b --attention ${DECODE_ATTN:-auto} --graphs on --profile-tokens ${PROFILE_TOKENS:-0} \
  --out "$OUT/decode_8b.json" 2>&1 | tail -60 | tee "$OUT/decode.log"
exit 0
