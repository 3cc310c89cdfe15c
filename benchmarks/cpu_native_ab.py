"""A/B of the CPU path's native pieces on the default model, batch 1: torch kernels only, native kernels per layer,
and the whole decoder stack in one native call (the default). Each variant runs in its own process (its `kernels:`
config section), one long greedy generation per rep, interleaved reps, medians.

    python benchmarks/cpu_native_ab.py --threads 2 --reps 3 --out benchmarks/results/cpu_native_ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

VARIANTS = {
    "torch kernels (kernels.native=false)": {"native": False},
    "native kernels, per layer (kernels.native_stack=false)": {"native_stack": False},
    "native decoder stack (default)": {},
}

CHILD = r"""
import json, sys, time
from weavelm import LLM, SamplingParams
threads, tokens, kernels = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
llm = LLM(device="cpu", num_threads=threads, kernels=kernels)
tok = llm.get_tokenizer()
text = tok.apply_chat_template([{"role": "user", "content": "Tell me a short story about a robot."}],
                               add_generation_prompt=True, tokenize=False)
prompt = {"prompt_token_ids": tok.encode(text, add_special_tokens=False)}
params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
t0 = time.perf_counter()
llm.generate([prompt], params)
print(json.dumps({"tok_s": tokens / (time.perf_counter() - t0)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu_native_ab.json"))
    args = ap.parse_args()
    raw: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep in range(args.reps):
        for name, kernels in VARIANTS.items():
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.threads), str(args.tokens),
                                  json.dumps(kernels)], capture_output=True, text=True, check=True)
            tps = json.loads(out.stdout.strip().splitlines()[-1])["tok_s"]
            raw[name].append(tps)
            print(f"rep {rep + 1} {name}: {tps:.1f} tok/s", flush=True)
    base = statistics.median(raw[next(iter(VARIANTS))])
    print(f"\nbatch 1, {args.tokens} greedy tokens after a chat prompt, {args.threads} threads, medians of {args.reps}")
    print("| variant | tok/s | ms/token | vs torch kernels |")
    print("|---|---:|---:|---:|")
    for name, v in raw.items():
        med = statistics.median(v)
        print(f"| {name} | {med:.1f} | {1000 / med:.2f} | {med / base:.2f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"threads": args.threads, "tokens": args.tokens, "raw": raw, "load_avg": os.getloadavg()}, f,
                  indent=1)


if __name__ == "__main__":
    main()
