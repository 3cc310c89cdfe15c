"""Multi-LoRA overhead: nano-vllm's throughput workload on a Qwen3-0.6B-shaped model (random weights, bf16), with
4 random rank-16 PEFT adapters (every projection: q/k/v/o/gate/up/down) spread round-robin across the requests,
against the same engine with no `lora:` section.

Run on the GPU machine from the repo root (after `source benchmarks/device_env.sh`):
    python benchmarks/gpu_lora.py --out bench_out/gpu_lora.json
CPU smoke test (tiny Qwen3, tiny workload, a few seconds):
    python benchmarks/gpu_lora.py --device cpu --tiny --out bench_out/gpu_lora_cpu.json

Variants, each in its own child process: `no-lora` (no `lora:` section: the model is not wrapped), `lora-base`
(`lora:` configured, every request on the base model: the cost of the wrapped layers alone) and `lora-4x16` (4
adapters, `max_loras: 4`, requests spread over them, CUDA graphs on). The adapters are written in PEFT's format
(adapter_config.json + adapter_model.safetensors) with safetensors, so the GPU machine needs no `peft`. The
overhead is `1 - tok/s(variant) / tok/s(no-lora)` on output tokens; the issue's aim is < 25% for lora-4x16.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from gpu_throughput import (  # noqa: E402  (the same model, workload and child protocol)
    child_make_model, prepare_model_and_workload, run_child)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NUM_ADAPTERS, RANK, ALPHA = 4, 16, 32


def write_adapter(path: str, cfg: dict, seed: int, rank: int = RANK, b_std: float = 0.02) -> str:
    """A random PEFT LoRA adapter for every projection of every layer (A ~ N(0, 1/in), B ~ N(0, b_std^2))."""
    import torch
    from safetensors.torch import save_file

    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for name in PROJECTIONS:
            part = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{name}"
            i, o = shapes[name]
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, i, generator=g) / i ** 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(o, rank, generator=g) * b_std
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": ALPHA, "target_modules": list(PROJECTIONS),
                   "bias": "none", "use_rslora": False, "lora_dropout": 0.0}, f)
    return path


def child_lora(job: dict) -> dict:
    from weavelm import LLM, LoRARequest
    from weavelm.bench.runner import run_workload, warmup
    from weavelm.bench.workload import load_jsonl

    wl = load_jsonl(job["workload"])
    extra = {"lora": {"max_loras": NUM_ADAPTERS, "max_lora_rank": RANK}} if job["lora"] else {}
    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job["dtype"], device=job["device"], loader="safetensors",
              sets=job["sets"], **extra)
    startup = time.perf_counter() - t0
    loras = [LoRARequest(f"a{i}", i + 1, p) for i, p in enumerate(job["adapters"])] or None
    warmup(llm.engine)
    run = run_workload(llm.engine, wl, progress=not job["quiet"], desc=job["label"], loras=loras)
    errors = [r.error for r in run.records if r.error]
    out = {**run.throughput(), "startup_s": startup, "device_name": _device_name(),
           "num_adapters": len(job["adapters"]), "lora_configured": job["lora"]}
    if errors:
        out["first_error"] = errors[0]
    llm.shutdown()
    return out


def _device_name() -> str:
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def table(results: list[dict]) -> str:
    base = next((r for r in results if r["name"] == "no-lora" and r["status"] == "ok"), None)
    head = ("variant", "status", "reqs", "errors", "out tok", "wall s", "out tok/s", "total tok/s", "overhead")
    rows = [head]
    for r in results:
        if r["status"] != "ok":
            rows.append((r["name"], r["status"][:60], *["-"] * 7))
            continue
        over = f"{100 * r['overhead']:.1f}%" if base is not None and "overhead" in r else "-"
        rows.append((r["name"], "ok", str(r["num_requests"]), str(r["num_errors"]), str(r["output_tokens"]),
                     f"{r['wall_s']:.2f}", f"{r['output_tok_s']:.1f}", f"{r['total_tok_s']:.1f}", over))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny Qwen3 and a tiny workload (CPU smoke test)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dtype", default=None, help="default bfloat16 (float32 with --tiny)")
    p.add_argument("--model-dir", help="where the random model is saved/reused (default: a temp dir)")
    p.add_argument("--num-prompts", type=int)
    p.add_argument("--input-len", help="LO:HI (default 100:1024; 8:48 with --tiny)")
    p.add_argument("--output-len", help="LO:HI (default 100:1024; 4:24 with --tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="sets", action="append", default=[], help="override for every variant")
    p.add_argument("--child-timeout", type=int, default=480, help="seconds per variant")
    p.add_argument("--out", default="bench_out/gpu_lora.json")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args()

    from weavelm.bench.report import write_json
    from weavelm.bench.throughput import platform_info

    dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    setup = prepare_model_and_workload(args, dtype, "weavelm_gpu_lora_")
    if setup is None:
        return 2
    work, model, cfg, wl, wl_path = setup
    adapters = [write_adapter(os.path.join(work, f"adapter{i}"), cfg, seed=100 + i) for i in range(NUM_ADAPTERS)]
    base = dict(model=model, dtype=dtype, device=args.device, workload=wl_path, quiet=args.quiet, sets=args.sets)
    variants = [("no-lora", False, []), ("lora-base", True, []), (f"lora-{NUM_ADAPTERS}x{RANK}", True, adapters)]
    results = []
    for label, lora, paths in variants:
        print(f"== {label}", file=sys.stderr)
        job = {**base, "label": label, "lora": lora, "adapters": paths}
        results.append({"name": label, **run_lora_child(job, args.child_timeout)})
    ref = next((r for r in results if r["name"] == "no-lora" and r["status"] == "ok"), None)
    for r in results:
        if ref is not None and r["status"] == "ok" and r is not ref:
            r["overhead"] = 1 - r["output_tok_s"] / ref["output_tok_s"]
    host = platform_info(argparse.Namespace(device="cpu"))
    host["device"] = next((r["device_name"] for r in results if r.get("device_name")), args.device)
    report = {"bench": "gpu_lora", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": host,
              "command": " ".join(sys.argv), "model": "tiny qwen3" if args.tiny else "Qwen3-0.6B shape, random weights",
              "dtype": dtype, "adapters": {"count": NUM_ADAPTERS, "rank": RANK, "alpha": ALPHA,
                                           "targets": list(PROJECTIONS)},
              "workload": wl.describe(), "results": results}
    write_json(report, args.out)
    print(f"{report['model']}, {dtype}, {host['device']}; workload {wl.source}")
    print(table(results))
    print(f"wrote {args.out}")
    return 0 if all(r["status"] == "ok" and not r.get("num_errors") for r in results) else 1


def run_lora_child(job: dict, timeout: int) -> dict:
    return run_child("lora", job, timeout, script=__file__)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _, _, kind, job_path, result_path = sys.argv
        with open(job_path) as f:
            job = json.load(f)
        result = {"lora": child_lora, "make": child_make_model}[kind](job)
        with open(result_path, "w") as f:
            json.dump(result, f)
        sys.exit(0)
    sys.exit(main())
