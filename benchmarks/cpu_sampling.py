"""Sampling cost on the CPU: the CPU sampler (inverse CDF, `cpu_sampling.py`) vs the device path's exponential race
(`sampler.exponential_race`) on the default model's vocabulary, and end-to-end tok/s of the default model at batch
1 and 8 for greedy, temperature 1.0 and temperature 0.7 with top-p 0.9. Prints a table, writes JSON.

    python benchmarks/cpu_sampling.py --threads 2 --out bench_out/cpu_sampling.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def _meta(n: int, temperature: float, top_p: float):
    from weavelm.sample.sampler import SamplingMetadata
    return SamplingMetadata(torch.full((n,), temperature), torch.zeros(n, dtype=torch.long),
                            torch.full((n,), top_p), torch.zeros(n), False, False, top_p < 1, False, {}, False)


def _ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


MODES = {"greedy": (0.0, 1.0), "temperature 1.0": (1.0, 1.0), "temperature 0.7, top-p 0.9": (0.7, 0.9)}
PROMPTS = ["The capital of France is", "Write a poem about", "Explain gravity", "List three fruits",
           "Hello, my name is", "Once upon a time", "The best way to learn", "Python is"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_out/cpu_sampling.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from weavelm.sample.cpu_sampling import sample_cpu
    from weavelm.sample.sampler import exponential_race

    kernel = []
    for n in (1, 8):
        logits = torch.randn(n, args.vocab) * 3
        for mode, (temp, top_p) in list(MODES.items())[1:]:
            m = _meta(n, temp, top_p)
            kernel.append({"batch": n, "mode": mode, "cpu_sampler_ms": _ms(lambda: sample_cpu(logits, m), 30),
                           "exponential_race_ms": _ms(lambda: exponential_race(logits, m), 30)})

    from weavelm import LLM, SamplingParams
    from weavelm.default_model import default_gguf_file
    llm = LLM(model=default_gguf_file(), device="cpu", model_runner={"cpu_threads": args.threads})
    e2e = []
    for n in (1, 8):
        for mode, (temp, top_p) in MODES.items():
            sp = SamplingParams(max_tokens=args.max_tokens, temperature=temp, top_p=top_p, ignore_eos=True)
            llm.generate(PROMPTS[:n], sp)
            best = 0.0
            for _ in range(args.repeats):
                t = time.perf_counter()
                llm.generate(PROMPTS[:n], sp)
                best = max(best, args.max_tokens * n / (time.perf_counter() - t))
            e2e.append({"batch": n, "mode": mode, "tok_s": best})
    llm.shutdown()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"threads": args.threads, "vocab": args.vocab, "sampling": kernel, "end_to_end": e2e,
                   "date": time.strftime("%Y-%m-%d %H:%M")}, f, indent=1)
    print(f"sampling one step, vocab {args.vocab}, {args.threads} threads (median of 30, ms)")
    print("| batch | mode | CPU sampler | exponential race |\n|---:|---|---:|---:|")
    for r in kernel:
        print(f"| {r['batch']} | {r['mode']} | {r['cpu_sampler_ms']:.2f} | {r['exponential_race_ms']:.2f} |")
    print(f"\ndefault model, {args.max_tokens} tokens, best of {args.repeats} (tok/s)")
    print("| batch | mode | tok/s |\n|---:|---|---:|")
    for r in e2e:
        print(f"| {r['batch']} | {r['mode']} | {r['tok_s']:.1f} |")


if __name__ == "__main__":
    main()
