#!/usr/bin/env bash
# GPU scaling of the parallel layouts (issue 26: TP, PP, DP, EP) on one multi-GPU host; the figures go to
# benchmarks/RESULTS.md. Run from the repo root on the GPU machine after carrying .whl (and .devkernels for FA3):
#   bash benchmarks/gpu_parallel.sh [tests] [dense] [moe]    (default: all; tables in the logs, JSON under $OUT)
# Layouts follow the cards found (2, 4 or 8); one that the engine refuses or that fails prints its error as a row.
# Helpers adding a strategy append their layouts to DENSE / MOE below (syntax: benchmarks/gpu_parallel.py --help).
set -uo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
source benchmarks/device_env.sh
parts=" ${*:-tests dense moe} "
want() { [[ $parts == *" $1 "* ]]; }
GPUS=$(nvidia-smi --list-gpus | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/parallel_cards.txt"
echo "GPUs: $GPUS" | tee -a "$OUT/parallel_cards.txt"

# dense model (Llama-3.1-8B shape): one GPU, then each strategy at 2 GPUs, then the 4- and 8-GPU combinations
DENSE="1 tp=2 pp=2 dp=2"
(( GPUS >= 4 )) && DENSE="$DENSE tp=4 pp=4 tp=2,pp=2 dp=2,tp=2 dp=4"
(( GPUS >= 8 )) && DENSE="$DENSE tp=8 tp=4,pp=2 tp=2,pp=4 dp=2,tp=4"
(( GPUS >= 2 )) && DENSE="$DENSE backend=ray,tp=2 backend=ray,pp=2"
# MoE model (Qwen3-30B-A3B shape, ~61 GB of bf16 weights: fits one H100 only with little KV, so start at 2 GPUs)
MOE="tp=2 tp=2,ep dp=2,ep"
(( GPUS >= 4 )) && MOE="$MOE tp=4 tp=4,ep dp=4,ep dp=2,tp=2,ep"
(( GPUS >= 8 )) && MOE="$MOE tp=8,ep dp=8,ep"

# 1. the parallel tests on the GPUs (pipeline / tensor parity against one rank over NCCL)
want tests && python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests/gpu/test_parallel_gpu.py \
  2>&1 | tail -5 | tee "$OUT/parallel_gpu_tests.log"
# 2. dense scaling
want dense && python3 benchmarks/gpu_parallel.py --model llama8b --layouts "$DENSE" \
  --out "$OUT/gpu_parallel_dense.json" 2>&1 | tee "$OUT/gpu_parallel_dense.log"
# 3. MoE scaling (EP vs TP experts)
want moe && python3 benchmarks/gpu_parallel.py --model qwen3_30b_a3b --layouts "$MOE" \
  --out "$OUT/gpu_parallel_moe.json" 2>&1 | tee "$OUT/gpu_parallel_moe.log"
exit 0
