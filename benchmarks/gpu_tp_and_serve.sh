#!/usr/bin/env bash
# The GPU-machine run behind the issue-11 (tensor parallelism, message queue) and issue-15 (server load) tables in
# benchmarks/RESULTS.md. Run from the repo root on the 2-GPU machine after carrying .whl and .devkernels:
#   bash benchmarks/gpu_tp_and_serve.sh [tests] [mq] [tp] [serve]   (default: all; logs and JSON under $OUT)
set -uo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
source benchmarks/device_env.sh
parts=" ${*:-tests mq tp serve} "
want() { [[ $parts == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/cards.txt"
# 1. the GPU test suite on one card (teacher-forced logits vs transformers for every backend, eager and graphs)
want tests && CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/gpu tests/test_triton_ops.py \
  2>&1 | tail -4 | tee "$OUT/gpu_tests.log"
# 2. message-queue cost at 1, 2, 4 ranks (CPU side of the executor)
want mq && python3 benchmarks/executor_message_queue.py --ranks 1,2,4 --iters 2000 --out "$OUT/executor_mq.json" \
  2>&1 | tee "$OUT/executor_mq.log"
# 3. TP=1 vs TP=2, Llama-3.1-8B shape, nano-vllm's workload and batch-1 decode
want tp && python3 benchmarks/tp_scaling.py --tp 1,2 --out "$OUT/tp_scaling.json" 2>&1 | tee "$OUT/tp_scaling.log"
# 4. the server at several rates vs offline, Qwen3-0.6B shape (dummy weights), one card
want serve || exit 0
export PATH=/tmp/site/bin:$PATH  # py-spy, from .whl
# the peer's Qwen3-0.6B-shaped model with an offline byte-level tokenizer (cp -r ../shared/peer .peer; carry it)
python3 .peer/make_model.py /tmp/q06 > "$OUT/make_model.log" 2>&1
# the server's default on a GPU: the engine core in its own process (as vLLM); then the core as a thread, to compare
CUDA_VISIBLE_DEVICES=0 python3 benchmarks/serve_load.py --model /tmp/q06 --dtype bfloat16 --device cuda \
  --rates 16,64,inf --num-requests 512 --input-len 256 --output-len 256 --vocab 10000 --offline \
  --client-procs 4 --py-spy "$OUT/serve_spy.txt" --json "$OUT/serve_load_gpu.json" 2>&1 | tail -25 | tee "$OUT/serve_load_gpu.log"
CUDA_VISIBLE_DEVICES=0 python3 benchmarks/serve_load.py --model /tmp/q06 --dtype bfloat16 --device cuda \
  --set engine_process=false --rates inf --num-requests 512 --input-len 256 --output-len 256 --vocab 10000 \
  --client-procs 4 --json "$OUT/serve_load_gpu_thread.json" 2>&1 | tail -8 | tee "$OUT/serve_load_gpu_thread.log"
