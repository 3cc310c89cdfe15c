"""Attention kernels on the GPU: achieved HBM bandwidth (GB/s) and TFLOP/s per kernel and per backend forward.

Run on the GPU machine from the repo root (FA3 is loaded from `<cache root>/fa3/` where benchmarks/device_env.sh puts it, see ../shared/GPU.md):
    python benchmarks/attention_kernels.py --out bench_out/attention_kernels.json [--sweep]
Llama-3.1-8B-like layer: 32 query heads, 8 KV heads, head 128, block 16, bf16. Bytes count what the kernel must
move (KV read, q read, out write); FLOPs are 4 * attended (query, key) pairs * heads * head_size.
`--sweep` times Triton launch configurations per case and reports the best next to the default.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests.attention_utils import make_batch  # noqa: E402
from weavelm.core.forward import AttentionSpec  # noqa: E402
from weavelm.core.registry import Registry  # noqa: E402

HEADS, KV_HEADS, HEAD, BLOCK = 32, 8, 128, 16
CASES = {
    "decode_b64_ctx4k": ([1] * 64, [4095] * 64),
    "decode_b8_ctx8k": ([1] * 8, [8191] * 8),
    "decode_b1_ctx16k": ([1], [16383]),
    "prefill_b4_2k": ([2048] * 4, [0] * 4),
    "prefill_chunk_b4_512_on_3584": ([512] * 4, [3584] * 4),
}


def bench(fn, rep_ms: int = 200) -> float:
    """Median seconds per call (triton's do_bench: CUDA events, L2 flushed between calls)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median") / 1e3


def work(query_lens, context_lens, elem: int) -> tuple[float, float]:
    pairs = sum(c * q + q * (q + 1) // 2 for q, c in zip(query_lens, context_lens))
    kv_tokens = sum(q + c for q, c in zip(query_lens, context_lens))
    nbytes = kv_tokens * KV_HEADS * HEAD * 2 * elem + 2 * sum(query_lens) * HEADS * HEAD * elem
    return nbytes, 4.0 * pairs * HEADS * HEAD


def batch_work(m, elem: int) -> tuple[float, float]:
    query_lens = m.query_start_loc_cpu.diff()
    return work(query_lens.tolist(), (m.seq_lens_cpu - query_lens).tolist(), elem)


def row(name: str, kernel: str, seconds: float, nbytes: float, flops: float, **extra) -> dict:
    return dict(case=name, kernel=kernel, us=seconds * 1e6, GBps=nbytes / seconds / 1e9,
                TFLOPs=flops / seconds / 1e12, **extra)


def triton_kernel_rows(name, b, kernels, sweep: bool) -> list[dict]:
    m, n = b.meta, b.meta.num_actual_tokens
    q3 = b.q.view(n, HEADS, HEAD)
    out = torch.empty_like(q3)
    kc, vc = b.kv_cache[0], b.kv_cache[1]
    nbytes, flops = batch_work(m, b.q.element_size())
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfg = kernels.select_config(m.max_query_len <= 1, m.num_reqs, m.max_query_len, m.max_seq_len, KV_HEADS, sms)

    def run(c):
        return lambda: kernels.paged_attention(q3, kc, vc, out, m.block_table, m.seq_lens, m.query_start_loc,
                                               m.num_reqs, b.scale, **c)

    rows = [row(name, "triton.paged_attention", bench(run(cfg)), nbytes, flops, config=cfg)]
    if sweep:
        decode = m.max_query_len <= 1
        if name == "decode_b64_ctx4k":
            space = dict(block_m=[16], tile_n=[64, 128], num_warps=[4], num_stages=[2, 3], num_splits=[1, 2])
        elif decode:
            space = dict(block_m=[16], tile_n=[64], num_warps=[4], num_stages=[3], num_splits=[4, 8, 16, 32, 64])
        else:
            space = dict(block_m=[64, 128], tile_n=[64, 128], num_warps=[4, 8], num_stages=[2, 3], num_splits=[1])
        timings = []
        for values in itertools.product(*space.values()):
            c = dict(zip(space, values))
            try:
                timings.append((bench(run(c), rep_ms=50), c))
            except Exception as e:  # out of shared memory / registers for this shape
                print(f"  {name} {c}: {type(e).__name__}", flush=True)
        if timings:
            t, c = min(timings, key=lambda x: x[0])
            rows.append(row(name, "triton.paged_attention (best of sweep)", t, nbytes, flops, config=c,
                            sweep=[dict(us=t * 1e6, **c) for t, c in timings]))
    return rows


def forward_rows(name, b, backends) -> list[dict]:
    rows = []
    m, n = b.meta, b.meta.num_actual_tokens
    nbytes, flops = batch_work(m, b.q.element_size())
    for bname, backend in backends.items():
        impl = backend.make_impl(HEADS, KV_HEADS, HEAD, b.scale)
        meta = backend.make_builder(torch.device("cuda")).build(m)
        t = bench(lambda: impl.forward(b.q, b.k, b.v, b.kv_cache, meta), rep_ms=100 if bname == "torch_ref" else 200)
        rows.append(row(name, f"{bname}.forward", t, nbytes, flops))
        if backend.graph_safe and m.max_query_len == 1:  # decode as the runner replays it: no launch overhead
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                impl.forward(b.q, b.k, b.v, b.kv_cache, meta)
            rows.append(row(name, f"{bname}.forward (CUDA graph)", bench(graph.replay), nbytes, flops))
    return rows


def cache_write_rows(cache_write, dtype) -> list[dict]:
    n = 8192
    k = torch.randn(n, KV_HEADS, HEAD, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    cache = torch.empty(2, n // BLOCK + 8, BLOCK, KV_HEADS, HEAD, device="cuda", dtype=dtype)
    slots = torch.randperm(cache.shape[1] * BLOCK, device="cuda")[:n]
    t = bench(lambda: cache_write.reshape_and_cache(k, v, cache[0], cache[1], slots))
    return [row(f"cache_write_{n}_tokens", "triton.reshape_and_cache", t, 4 * k.numel() * k.element_size(), 0.0)]


def copy_bandwidth() -> float:
    x = torch.empty(2 ** 30 // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() * 2 / bench(lambda: y.copy_(x)) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out/attention_kernels.json")
    ap.add_argument("--sweep", action="store_true", help="also time Triton launch configurations")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    args = ap.parse_args()
    from weavelm.ops import cache_write
    from weavelm.plugins.attention.triton import kernels

    dtype = torch.bfloat16
    reg = Registry.load()
    backends = {}
    for bname in reg.names("attention"):
        cls = reg.get("attention", bname)
        reasons = cls.check(AttentionSpec("cuda", dtype, HEAD, HEADS, KV_HEADS, BLOCK))
        if reasons:
            print(f"skip {bname}: {'; '.join(reasons)}")
        else:
            backends[bname] = cls(cls.Options())
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=__import__("triton").__version__, dtype=str(dtype),
                  shape=dict(heads=HEADS, kv_heads=KV_HEADS, head=HEAD, block=BLOCK),
                  copy_GBps=copy_bandwidth(), rows=[])
    result["rows"] += cache_write_rows(cache_write, dtype)
    for name in args.cases.split(","):
        t0 = time.time()
        b = make_batch(*CASES[name], num_heads=HEADS, num_kv_heads=KV_HEADS, head_size=HEAD, block_size=BLOCK,
                       dtype=dtype, device="cuda")
        result["rows"] += triton_kernel_rows(name, b, kernels, args.sweep)
        result["rows"] += forward_rows(name, b, backends)
        print(f"{name}: {time.time() - t0:.1f}s", flush=True)
        del b
        torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{result['device']}, torch {result['torch']}, triton {result['triton']}, {dtype}; "
          f"copy bandwidth {result['copy_GBps']:.0f} GB/s")
    print(f"{'case':30} {'kernel':40} {'us':>9} {'GB/s':>7} {'%copy':>6} {'TFLOP/s':>8}")
    for r in result["rows"]:
        print(f"{r['case']:30} {r['kernel']:40} {r['us']:9.1f} {r['GBps']:7.0f} "
              f"{100 * r['GBps'] / result['copy_GBps']:5.0f}% {r['TFLOPs']:8.1f}  {r.get('config', '')}")


if __name__ == "__main__":
    main()
