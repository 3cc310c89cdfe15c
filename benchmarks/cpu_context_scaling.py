"""Batch-1 decode speed of the default model on the CPU as the context grows: prefill time and decode ms per token
after prompts of several lengths (random token ids, greedy, ignore EOS), from the engine's own per-request timings
(first token and finish), so prefill and decode are separated exactly.

    python benchmarks/cpu_context_scaling.py --threads 2 --contexts 200,1000,2000 \
        --out benchmarks/results/cpu_context.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--contexts", default="200,1000,2000")
    ap.add_argument("--tokens", type=int, default=129)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu_context.json"))
    args = ap.parse_args()
    from weavelm import LLM, SamplingParams

    llm = LLM(device="cpu", num_threads=args.threads)
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(64)]}], params)  # warm-up
    rows = []
    print(f"batch 1, {args.tokens - 1} decode tokens, {args.threads} threads, median of {args.reps}")
    print("| context (prompt tokens) | prefill ms | decode ms/token | decode tok/s |")
    print("|---:|---:|---:|---:|")
    for ctx in (int(c) for c in args.contexts.split(",")):
        pre, dec = [], []
        for _ in range(args.reps):  # a fresh random prompt each rep: no prefix-cache hit
            out = llm.generate([{"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(ctx)]}], params)[0]
            m = out.metrics
            pre.append((m["first_token"] - m["arrival"]) * 1000)
            dec.append((m["now"] - m["first_token"]) / (args.tokens - 1) * 1000)
        row = {"context": ctx, "prefill_ms": statistics.median(pre), "decode_ms_per_token": statistics.median(dec),
               "raw_prefill_ms": pre, "raw_decode_ms": dec}
        rows.append(row)
        print(f"| {ctx} | {row['prefill_ms']:.0f} | {row['decode_ms_per_token']:.2f} | "
              f"{1000 / row['decode_ms_per_token']:.1f} |", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"threads": args.threads, "tokens": args.tokens, "rows": rows, "load_avg": os.getloadavg()}, f,
                  indent=1)


if __name__ == "__main__":
    main()
