#!/usr/bin/env bash
# The GPU-machine runs behind the multi-LoRA (issue 12), speculative decoding (issue 14) and server (issue 15)
# tables of benchmarks/RESULTS.md. From the repo root on the GPU machine, carrying .whl (pydantic & co., gguf,
# py-spy, httptools), .devkernels (../shared/tools/device-kernels.sh fa3) and .peer (cp -r ../shared/peer .peer):
#   bash benchmarks/gpu_lora_spec_serve.sh [tests] [lora] [spec] [spec8b] [serve]   (logs and JSON under $OUT)
# `spec` needs the default model's GGUF at $SMOL_GGUF (it is too big to travel in one call: see RESULTS.md).
set -uo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
source benchmarks/device_env.sh
parts=" ${*:-tests lora spec spec8b serve} "
want() { [[ $parts == *" $1 "* ]]; }
# 1. GPU tests: teacher-forced logits vs transformers for every backend (eager and graphs), the LoRA kernels and
#    engine, speculative decoding on the device
want tests && python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/gpu tests/test_triton_ops.py \
  tests/test_lora_triton.py 2>&1 | tail -6 | tee "$OUT/gpu_tests.log"
# 2. LoRA overhead: Qwen3-0.6B shape, nano-vllm's workload, 4 rank-16 adapters vs none
want lora && python3 benchmarks/gpu_lora.py --out "$OUT/gpu_lora.json" 2>&1 | tail -12 | tee "$OUT/gpu_lora.log"
# 3. speculative decoding on the default model (real weights), batch 1 and 8, with and without ngram
want spec && python3 benchmarks/spec_decode.py --device cuda --model "${SMOL_GGUF:?}" --batch-sizes 1,8 \
  --max-tokens 256 --repeats 3 --out "$OUT/spec_gpu.json" 2>&1 | tail -12 | tee "$OUT/spec_gpu.log"
# 4. the Llama-3.1-8B shape with a Llama-3.2-1B-shaped random draft: overhead only
want spec8b && python3 benchmarks/spec_decode.py --device cuda --shape llama-8b --proposers none,ngram,draft_model \
  --batch-sizes 1,8 --max-tokens 128 --repeats 2 --out "$OUT/spec_gpu_8b.json" 2>&1 | tail -12 \
  | tee "$OUT/spec_gpu_8b.log"
# 5. the server at several rates vs offline LLM.generate, Qwen3-0.6B shape, engine core in its own process
#    (one API server: the event loop reads the core's outputs itself)
want serve || exit 0
export PATH=/tmp/site/bin:$PATH  # py-spy, from .whl
python3 .peer/make_model.py /tmp/q06 > "$OUT/make_model.log" 2>&1
python3 benchmarks/serve_load.py --model /tmp/q06 --dtype bfloat16 --device cuda --rates 16,64,inf \
  --num-requests 512 --input-len 256 --output-len 256 --vocab 10000 --offline --client-procs 4 \
  --py-spy "$OUT/serve_spy.txt" --json "$OUT/serve_load_gpu.json" 2>&1 | tail -12 | tee "$OUT/serve_load_gpu.log"
# 6. saturation only, with 1, 2 and 4 API-server processes in front of the one core (`--api-server-count`)
for n in 1 2 4; do
  python3 benchmarks/serve_load.py --model /tmp/q06 --dtype bfloat16 --device cuda --rates inf \
    --num-requests 512 --input-len 256 --output-len 256 --vocab 10000 --offline --client-procs 4 \
    --api-server-count $n --json "$OUT/serve_load_gpu_api$n.json" 2>&1 | tail -6 | tee "$OUT/serve_load_gpu_api$n.log"
done
