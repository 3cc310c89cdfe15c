"""Non-attention layer ops, torch eager (the layers' reference path) vs the Triton kernels of layers/triton_ops.py.

On the GPU machine, from the repo root (Qwen3-0.6B sizes by default: hidden 1024, 16 query / 8 KV heads of 128,
intermediate 3072, bf16, 256 and 8192 tokens):
    python benchmarks/layer_ops.py --out bench_out/layer_ops.json [--compile]
On CPU the kernels run in triton's interpreter (set here when missing), which only shows the script works:
    TRITON_INTERPRET=1 python benchmarks/layer_ops.py --device cpu --tokens 8 --hidden 64 --heads 4 --kv-heads 2 \
        --head-dim 16 --intermediate 96 --max-positions 64 --dtype float32
GB/s counts the bytes an op must move (inputs read once, outputs written once). `max_diff` is the largest
|triton - torch| of the op's outputs; `--compile` adds a column for torch.compile of the torch path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (triton interpreter)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 8192], help="flattened batch sizes to time")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--max-positions", type=int, default=40960)
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the torch path")
    p.add_argument("--rep-ms", type=int, default=200, help="CUDA: milliseconds of repetitions per measurement")
    p.add_argument("--reps", type=int, default=3, help="CPU: timed calls per measurement")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    return p.parse_args(argv)


def make_cases(args, torch, device, dtype):
    """Yields (tokens, {op: (torch_fn, triton_fn, bytes_moved)}); every fn returns a tuple of tensors."""
    from transformers import LlamaConfig

    from weavelm.layers import triton_ops as ops
    from weavelm.layers import RMSNorm, RotaryEmbedding, SiluAndMul

    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)

    def torch_path(m):
        m.use_triton = False
        for p in m.parameters():
            p.data = torch.randn(p.shape, generator=g).to(dtype)
        return m.to(device)

    hd, hq, hk = args.head_dim, args.heads, args.kv_heads
    norm, head_norm, act = torch_path(RMSNorm(args.hidden)), torch_path(RMSNorm(hd)), torch_path(SiluAndMul())
    cfg = LlamaConfig(hidden_size=hq * hd, num_attention_heads=hq, num_key_value_heads=hk, head_dim=hd,
                      rope_theta=1e6)
    rope = torch_path(RotaryEmbedding(cfg, hd, args.max_positions))
    elem = torch.empty((), dtype=dtype).element_size()

    def cases(n: int) -> dict:
        x, res, gate_up = rand(n, args.hidden), rand(n, args.hidden), rand(n, 2 * args.intermediate)
        q, k, _ = rand(n, (hq + 2 * hk) * hd).split([hq * hd, hk * hd, hk * hd], dim=-1)
        q, k = q.reshape(n, hq, hd), k.reshape(n, hk, hd)
        positions = torch.randint(0, args.max_positions, (n,), generator=g).to(device)
        qk_bytes = n * (hq + hk) * hd * elem
        return {
            "rms_norm": (lambda: (norm(x),), lambda: (ops.rms_norm(x, norm.weight, norm.eps),),
                         2 * n * args.hidden * elem),
            "fused_add_rms_norm": (lambda: norm(x, res), lambda: ops.fused_add_rms_norm(x, res, norm.weight, norm.eps),
                                   4 * n * args.hidden * elem),
            "qk_norm": (lambda: (head_norm(q), head_norm(k)),
                        lambda: (ops.rms_norm(q, head_norm.weight, head_norm.eps),
                                 ops.rms_norm(k, head_norm.weight, head_norm.eps)),
                        2 * qk_bytes),
            "silu_and_mul": (lambda: (act(gate_up),), lambda: (ops.silu_and_mul(gate_up),),
                             3 * n * args.intermediate * elem),
            "rotary": (lambda: rope(positions, q, k),
                       lambda: ops.rotary_embedding(positions, q, k, rope.cos_cache, rope.sin_cache),
                       2 * qk_bytes + n * hd * 4 + n * 8),
        }

    for n in args.tokens:
        yield n, cases(n)


def timer(device: str, args):
    if device.startswith("cuda"):
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=args.rep_ms, return_mode="median") / 1e3

    def cpu_time(fn) -> float:
        fn()
        samples = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)
    return cpu_time


def max_diff(a, b) -> float:
    return max((x.float() - y.float()).abs().max().item() if x.numel() else 0.0 for x, y in zip(a, b))


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the only way its kernels run on CPU
    dtype = getattr(torch, args.dtype)
    bench = timer(device, args)
    rows = []
    with torch.inference_mode():
        for n, cases in make_cases(args, torch, device, dtype):
            for op, (torch_fn, triton_fn, nbytes) in cases.items():
                t_torch, t_triton = bench(torch_fn), bench(triton_fn)
                row = {"op": op, "tokens": n, "torch_us": t_torch * 1e6, "triton_us": t_triton * 1e6,
                       "speedup": t_torch / t_triton, "torch_GBps": nbytes / t_torch / 1e9,
                       "triton_GBps": nbytes / t_triton / 1e9, "max_diff": max_diff(triton_fn(), torch_fn())}
                if args.compile:
                    compiled = torch.compile(torch_fn, dynamic=False)
                    row["compiled_us"] = bench(compiled) * 1e6
                rows.append(row)
    print_table(rows, args.compile)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu (triton interpreter)"
        meta = {"device": name, "dtype": args.dtype, "torch": torch.__version__, "triton": _triton_version(),
                **{k: getattr(args, k) for k in ("hidden", "heads", "kv_heads", "head_dim", "intermediate")}}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {args.out}")
    return rows


def _triton_version() -> str:
    import triton
    return triton.__version__


def print_table(rows: list[dict], compiled: bool) -> None:
    head = f"{'op':<20}{'tokens':>7}{'torch us':>11}{'triton us':>11}{'speedup':>9}{'torch GB/s':>12}" \
           f"{'triton GB/s':>13}{'max_diff':>10}" + (f"{'compiled us':>13}" if compiled else "")
    print(head)
    print("-" * len(head))
    for r in rows:
        line = (f"{r['op']:<20}{r['tokens']:>7}{r['torch_us']:>11.1f}{r['triton_us']:>11.1f}{r['speedup']:>8.2f}x"
                f"{r['torch_GBps']:>12.1f}{r['triton_GBps']:>13.1f}{r['max_diff']:>10.2g}")
        print(line + (f"{r['compiled_us']:>13.1f}" if compiled else ""))


if __name__ == "__main__":
    main()
