"""int4 / int8 weight-only on CUDA: the GEMM kernels at Llama-3.1-8B's linear shapes, and whole-model decode.

  python benchmarks/gpu_int4.py kernels --out int4_kernels.json
  python benchmarks/gpu_int4.py decode --schemes bf16 int8 gptq awq --out int4_decode.json

`kernels`: per shape (qkv, o, gate_up, down) and row count, the median time of cuBLAS bf16 `F.linear`, the Triton int4
GEMM (group 128) and the Triton int8 GEMM, with the weight bandwidth each achieves (weight bytes / time).
`decode`: the llama-8b shape with random weights, batch 1 and batch 64: decode tok/s (the time of 128 extra output
tokens, prefill excluded), resident weight bytes (parameters plus quantized packs) and peak GPU memory. int4 schemes
read a config.json whose `quantization_config` is GPTQ's / AWQ's, and a loader registered here fills the layers'
stored tensors with random codes and valid groups (no checkpoint file is written).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
SHAPES_8B = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
GROUP = 128


def quant_config(scheme: str, group: int) -> dict:
    if scheme == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": True,
                "checkpoint_format": "gptq"}
    return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}


def _median_ms(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def kernels(args) -> dict:
    from weavelm.ops.int4_kernels import Int4Weight
    from weavelm.ops.triton_int_gemm import int8_gemm

    rows = []
    for name, (k, n) in SHAPES_8B.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        q4 = Int4Weight(torch.randint(-2 ** 31, 2 ** 31 - 1, (k // 8, n), dtype=torch.int32, device="cuda"),
                        torch.full((k // GROUP, n), 0.002, device="cuda", dtype=torch.bfloat16),
                        torch.full((k // GROUP, n), 8.0, device="cuda", dtype=torch.bfloat16), GROUP)
        q8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        s8 = torch.full((n,), 0.001, device="cuda", dtype=torch.bfloat16)
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t = {"bf16": _median_ms(lambda: F.linear(x, w)), "int4": _median_ms(lambda: q4.mm(x)),
                 "int8": _median_ms(lambda: int8_gemm(x, q8, s8))}
            nbytes = {"bf16": n * k * 2, "int4": q4.nbytes(), "int8": n * k + n * 2}
            row = {"shape": name, "k": k, "n": n, "rows": m, **{f"{kind}_ms": v for kind, v in t.items()},
                   **{f"{kind}_weight_tb_s": nbytes[kind] / (t[kind] * 1e-3) / 1e12 for kind in t}}
            rows.append(row)
            print(row, flush=True)
        w = q4 = q8 = None
        torch.cuda.empty_cache()
    return {"rows": rows}


def _random_loader_cls(group: int):
    from weavelm.plugins.loaders.dummy import DummyLoader

    class RandomInt4Loader(DummyLoader):
        """The dummy loader, plus int4 layers' stored tensors: random codes, zero points 8 (AWQ / GPTQ v2 words),
        scales near 0.02 / 8, groups in order."""

        name = "random_int4"

        def load_weights(self, model, path: str) -> None:
            gens: dict = {}
            with torch.no_grad():
                for name, p in model.named_parameters():
                    g = gens.get(p.device) or gens.setdefault(p.device, torch.Generator(p.device).manual_seed(0))
                    if p.dtype in (torch.int32, torch.int64):
                        if name.endswith("g_idx"):
                            p.copy_(torch.arange(p.numel(), device=p.device) // group)
                        elif name.endswith(("qzeros", "weight_zero_point")):
                            p.fill_(0x77777777 if "gptq" in path else -2004318072)  # nibbles 7 (v1: 8) / 8
                        else:
                            p.random_(-2 ** 31, 2 ** 31 - 1, generator=g)
                    elif name.endswith(("scales", "weight_scale")):
                        p.fill_(0.0025)
                    elif name.endswith("norm.weight"):
                        p.fill_(1.0)
                    else:
                        p.normal_(0.0, 0.02, generator=g)

    return RandomInt4Loader


def _weight_bytes(model) -> int:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for m in model.modules():
        pack = getattr(m, "qpack", None)
        if pack is not None:
            int8 = getattr(pack, "int8", None)
            total += (int8 or pack).nbytes()
    return total


def decode(args) -> dict:
    from gpu_decode import write_config

    from weavelm import LLM, SamplingParams
    from weavelm.core.registry import Registry

    rows = []
    for scheme in args.schemes:
        path = write_config(args.shape, tempfile.mkdtemp(prefix=f"weavelm_{scheme}_"))
        if scheme in ("gptq", "awq"):
            with open(os.path.join(path, "config.json")) as f:
                cfg = json.load(f)
            cfg["quantization_config"] = quant_config(scheme, args.group_size)
            with open(os.path.join(path, "config.json"), "w") as f:
                json.dump(cfg, f)
        registry = Registry.load()
        registry.add("loader", "random_int4", _random_loader_cls(args.group_size))
        for module in ("gptq", "awq"):
            registry.register_module(f"weavelm.plugins.quantization.{module}")
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        llm = LLM(model=path, dtype=args.dtype, device=args.device, loader="random_int4", registry=registry,
                  quantization="int8" if scheme == "int8" else "auto", max_model_len=1024,
                  gpu_memory_utilization=0.85, scheduler={"max_num_seqs": 64})
        model = llm.collective_rpc("apply_model", (lambda m: m,))[0]
        kinds = sorted({getattr(m.quant_method, "kind", "") for m in model.modules()
                        if getattr(m, "quant_method", None) is not None})
        wbytes = _weight_bytes(model)
        for batch in args.batches:
            prompts = [{"prompt_token_ids": list(range(1 + i, 129 + i))} for i in range(batch)]

            def timed(n: int) -> float:
                t0 = time.perf_counter()
                llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
                return time.perf_counter() - t0

            timed(8)
            short, long = min(timed(8) for _ in range(2)), min(timed(136) for _ in range(2))
            row = {"scheme": scheme, "kernels": kinds, "batch": batch, "decode_tok_s": batch * 128 / (long - short),
                   "weight_gb": wbytes / 1e9}
            if args.device == "cuda":
                row["peak_gpu_gb_load_kv_and_run"] = torch.cuda.max_memory_allocated() / 1e9
            rows.append(row)
            print(row, flush=True)
        llm.shutdown()
        llm = model = None
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kernels")
    k.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 256])
    d = sub.add_parser("decode")
    d.add_argument("--schemes", nargs="+", default=["bf16", "int8", "gptq", "awq"])
    d.add_argument("--shape", default="llama-8b", help="a shape of benchmarks/gpu_decode.py")
    d.add_argument("--group-size", type=int, default=GROUP)
    d.add_argument("--device", default="cuda")
    d.add_argument("--dtype", default="bfloat16")
    d.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    for p in (k, d):
        p.add_argument("--out", default=None)
    args = ap.parse_args()
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"card": card, **(kernels(args) if args.cmd == "kernels" else decode(args))}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
