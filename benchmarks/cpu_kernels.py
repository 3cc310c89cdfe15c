"""The CPU matmul kernels on the default model's shapes: weavelm's native block kernels (fp32 activations, llama.cpp's
exact Q4 / Q8_0 blocks) against torch's int4 / int8 weight-only kernels (bf16 activations) and dense fp32.

    python benchmarks/cpu_kernels.py --threads 1 --out benchmarks/results/cpu_kernels.json

Each cell is the best of `--reps` timings of `--iters` calls, in microseconds. Weights are random (the kernels'
speed does not depend on the values); one weight per shape, so small shapes run from cache as in a real decode step
only partly; the end-to-end figures are in cpu_peers.py.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from weavelm.ops import native
from weavelm.ops.quant_kernels import BlockQ4Pack, BlockQ8Pack, Int4Pack, Int8Pack

SHAPES = {"qkv 576x960": (576, 960), "o 576x576": (576, 576), "gate_up 576x3072": (576, 3072),
          "down 1536x576": (1536, 576), "logits 576x49152": (576, 49152)}


def best_us(fn, iters: int, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - t0) / iters)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu_kernels.json"))
    args = ap.parse_args()
    if not native.available():
        raise SystemExit(native.unavailable_reason())
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    print(f"threads {args.threads}, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
          f"microseconds per call, best of {args.reps} x {args.iters}")
    print("| op (K x N) | M | native Q4 blocks (fp32) | native Q8 blocks (fp32) | torch int4 (bf16 act) | "
          "torch int8 (bf16 act) | dense fp32 F.linear |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (k, n) in SHAPES.items():
        q = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
        d = rng.uniform(0.001, 0.01, size=(n, k // 32)).astype(np.float32)
        m = -8 * d
        q4 = BlockQ4Pack.from_codes(q, d, m)
        w = q4.dequantize()
        q8 = BlockQ8Pack.quantize(w)
        i4 = Int4Pack.from_codes(q, d, m + 8 * d)
        i8 = Int8Pack.quantize(w)
        for mm in rows:
            x = torch.randn(mm, k)
            iters = max(3, args.iters // (10 if n > 10000 else 1))
            cells = {"native_q4": best_us(lambda: q4.mm(x), iters, args.reps),
                     "native_q8": best_us(lambda: q8.mm(x), iters, args.reps)}
            with native.disabled():
                cells["torch_int4"] = best_us(lambda: i4.mm(x), iters, args.reps)
                cells["torch_int8"] = best_us(lambda: i8.mm(x), iters, args.reps)
            cells["dense_fp32"] = best_us(lambda: F.linear(x, w), iters, args.reps)
            results.append({"op": name, "k": k, "n": n, "m": mm, **cells})
            print(f"| {name} | {mm} | " + " | ".join(f"{cells[c]:.0f}" for c in
                                                     ("native_q4", "native_q8", "torch_int4", "torch_int8",
                                                      "dense_fp32")) + " |", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"threads": args.threads, "torch": torch.__version__, "results": results,
                   "load_avg": os.getloadavg()}, f, indent=1)


if __name__ == "__main__":
    main()
