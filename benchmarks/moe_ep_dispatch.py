"""Expert-parallel dispatch: all-to-all vs all-gather + reduce-scatter, for ranks holding different tokens (DP
attention + EP MoE), one FusedMoE layer, timed per call on every rank (rank 0 reports the slowest rank's median).

    python benchmarks/moe_ep_dispatch.py --out benchmarks/results/moe_ep_dispatch.json           # CPU, gloo, 2 ranks
    python benchmarks/moe_ep_dispatch.py --device cuda --world 2 --shape qwen3-30b-a3b --out $OUT/ep.json   # nccl

Each row: tokens per rank, the combine path, median ms per layer call (the slowest rank's; the paths are
interleaved call by call, so a shared machine's load hits them alike), and for reference
`replicated` (every rank the same tokens, local experts + all-reduce: EP over tensor-parallel ranks). Token counts
are equal on all ranks except rank 0, which holds half (uneven batches are the DP case).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

SHAPES = {"small": dict(hidden=256, intermediate=128, experts=16, top_k=2),
          "qwen3-30b-a3b": dict(hidden=2048, intermediate=768, experts=128, top_k=8)}


def _rank(rank: int, args: argparse.Namespace, port: int, queue) -> None:
    import torch.distributed as dist

    from weavelm.distributed import TensorParallelGroup
    from weavelm.layers.expert_parallel import ExpertParallel
    from weavelm.layers.fused_moe import FusedMoE

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = SHAPES[args.shape]
    group = TensorParallelGroup(rank, args.world)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    paths = ("replicated", "all2all", "allgather")
    for tokens in args.tokens:
        mine = max(1, tokens // 2) if rank == 0 else tokens
        layers, inputs = {}, {}
        for path in paths:
            ep = ExpertParallel(group, tokens_replicated=path == "replicated",
                                dispatch="all2all" if path == "replicated" else path)
            torch.set_default_dtype(dtype)
            with torch.device(device):
                layers[path] = FusedMoE(shape["hidden"], shape["intermediate"], shape["experts"], shape["top_k"],
                                        True, tp=group, ep=ep)
            torch.set_default_dtype(torch.float32)
            for p in layers[path].parameters():
                p.data.normal_(0, 0.05)
            inputs[path] = torch.randn(tokens if path == "replicated" else mine, shape["hidden"], device=device,
                                       dtype=dtype)
        times: dict[str, list[float]] = {path: [] for path in paths}
        with torch.no_grad():
            for i in range(args.warmup + args.iters):
                for path in paths:  # interleaved, so load on a shared machine hits every path alike
                    dist.barrier()
                    sync()
                    t0 = time.perf_counter()
                    layers[path](inputs[path])
                    sync()
                    if i >= args.warmup:
                        times[path].append(time.perf_counter() - t0)
        for path in paths:
            med = torch.tensor([statistics.median(times[path]) * 1e3], dtype=torch.float64)
            dist.all_reduce(med, op=dist.ReduceOp.MAX)  # the step waits for the slowest rank
            rows.append({"tokens_per_rank": tokens, "rank0_tokens": max(1, tokens // 2), "path": path,
                         "ms": round(med.item(), 4)})
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="moe_ep_dispatch.json")
    args = ap.parse_args()
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, args, port, queue)) for r in range(args.world)]
    for p in procs:
        p.start()
    rows = queue.get()
    for p in procs:
        p.join()
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = {"device": device, "world": args.world, "shape": SHAPES[args.shape], "load_average": load,
              "rows": rows}
    for r in rows:
        print(f"{r['tokens_per_rank']:5d} tokens/rank  {r['path']:10s}  {r['ms']:8.3f} ms")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
