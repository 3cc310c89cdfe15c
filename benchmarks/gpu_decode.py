"""Batch-1 decode speed of a model shape with random weights (default: Llama-3.1-8B, bf16) on CUDA.

Prints a table (one row per attention backend x CUDA graphs on/off) and writes JSON. Decode tok/s counts the
tokens after the first one over the time after the first token, so prefill is excluded.

  python benchmarks/gpu_decode.py --shape llama-8b --out decode.json
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time

import torch

SHAPES = {
    "llama-8b": dict(arch="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=5e5,
                     max_position_embeddings=131072,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "qwen3-0.6b": dict(arch="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=8192),
    "tiny": dict(arch="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048),
}


def write_config(shape: str, path: str) -> str:
    from transformers import LlamaConfig, Qwen3Config

    kw = dict(SHAPES[shape])
    arch = kw.pop("arch")
    cfg = (LlamaConfig if arch == "llama" else Qwen3Config)(**kw)
    cfg.architectures = ["LlamaForCausalLM" if arch == "llama" else "Qwen3ForCausalLM"]
    cfg.save_pretrained(path)
    return path


def weight_bytes(llm) -> int:
    model = llm.engine.client.core.executor.worker.runner.bundle.model
    return sum(p.numel() * p.element_size() for p in model.parameters())


def copy_bandwidth(device: str, gib: float = 2.0, iters: int = 20) -> float:
    """The card's device-to-device copy bandwidth in bytes/s (bytes read + written), median of `iters` copies of a
    `gib` GiB buffer: the roofline a batch-1 decode, which reads every weight once per token, is measured against."""
    n = int(gib * (1 << 30)) // 2
    src = torch.randn(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / times[len(times) // 2]


def run_one(path: str, attention: str, eager: bool, args) -> dict:
    from weavelm import LLM, SamplingParams

    llm = LLM(model=path, dtype=args.dtype, device=args.device, loader="dummy", attention=attention,
              enforce_eager=eager, max_model_len=args.prompt_len + args.output_len + 16,
              cache={"num_blocks": 64 + (args.prompt_len + args.output_len) // 16},
              scheduler={"max_num_seqs": 1, "max_num_batched_tokens": max(2048, args.prompt_len)},
              model_runner={"cuda_graph_max_bs": 1})
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    prompt = {"prompt_token_ids": list(range(1, args.prompt_len + 1))}
    llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # warm up
    best = None
    for _ in range(args.repeats):
        stamps = []
        for _ in llm.stream(prompt, params):  # a token arrives once its step's device work is done
            stamps.append(time.perf_counter())
        decode_s = stamps[-1] - stamps[0]
        tps = (len(stamps) - 1) / decode_s
        best = max(best or 0.0, tps)
    wbytes = weight_bytes(llm)
    profile = profile_decode(llm, prompt, args.profile_tokens) if args.profile_tokens else None
    llm.shutdown()
    del llm
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return {"attention": attention, "cuda_graphs": not eager, "decode_tok_s": best,
            "ms_per_token": 1000.0 / best, "weight_gb": wbytes / 1e9,
            "achieved_weight_bw_tb_s": wbytes * best / 1e12, **({"profile": profile} if profile else {})}


def profile_decode(llm, prompt: dict, num_tokens: int) -> dict:
    """Kernel time per decoded token by kernel name (top 25) and by category, over `num_tokens` decode steps
    under the torch profiler (after the prefill, which is left out)."""
    from torch.profiler import ProfilerActivity, profile

    from vs_nanovllm import categorize
    from weavelm import SamplingParams

    params = SamplingParams(max_tokens=num_tokens + 8, temperature=0.0, ignore_eos=True)
    stream = llm.stream(prompt, params)
    for _ in range(8):
        next(stream)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in stream:
            pass
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    by_name: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            us = e.device_time if hasattr(e, "device_time") else e.cuda_time
            entry = by_name.setdefault(e.name[:90], [0.0, 0])
            entry[0] += us
            entry[1] += 1
    per_tok = {k: (v[0] / num_tokens, v[1] / num_tokens) for k, v in by_name.items()}
    cats: dict[str, float] = {}
    for k, (us, _) in per_tok.items():
        cats[categorize(k)] = cats.get(categorize(k), 0.0) + us
    top = sorted(per_tok.items(), key=lambda kv: -kv[1][0])[:25]
    return {"wall_ms_per_token": wall * 1e3 / num_tokens,
            "kernel_ms_per_token": sum(v[0] for v in per_tok.values()) / 1e3,
            "kernels_per_token": sum(v[1] for v in per_tok.values()),
            "by_category_us": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "top_kernels_us_and_count": [(k, round(us, 2), round(c, 2)) for k, (us, c) in top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    ap.add_argument("--attention", nargs="+", default=["auto", "triton", "flash_attn"])
    ap.add_argument("--graphs", choices=("both", "on", "off"), default="both")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile-tokens", type=int, default=0, help="profile this many decode steps per row")
    ap.add_argument("--out", default="gpu_decode.json")
    args = ap.parse_args()
    path = write_config(args.shape, tempfile.mkdtemp(prefix="weavelm_shape_"))
    bw = copy_bandwidth(args.device) if args.device == "cuda" else None
    modes = {"both": [False, True], "on": [False], "off": [True]}[args.graphs]
    rows = []
    for attention in args.attention:
        for eager in modes:
            try:
                rows.append(run_one(path, attention, eager, args))
            except Exception as e:  # a backend that cannot run here is reported, not fatal
                rows.append({"attention": attention, "cuda_graphs": not eager, "error": f"{type(e).__name__}: {e}"})
            print(rows[-1], flush=True)
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = {"shape": args.shape, "card": card, "prompt_len": args.prompt_len, "output_len": args.output_len,
              "dtype": args.dtype, "copy_bandwidth_tb_s": bw and bw / 1e12, "rows": rows}
    for r in rows:
        if bw and "error" not in r:
            r["roofline_tok_s"] = bw / (r["weight_gb"] * 1e9)
            r["share_of_roofline"] = r["decode_tok_s"] / r["roofline_tok_s"]
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nbatch-1 decode, {args.shape}, {args.dtype}, {card}, prompt {args.prompt_len}, output {args.output_len}")
    for r in rows:
        if r.get("profile"):
            pr = r["profile"]
            print(f"profile ({r['attention']}, graphs {r['cuda_graphs']}): wall {pr['wall_ms_per_token']:.3f} ms/token, "
                  f"kernels {pr['kernel_ms_per_token']:.3f} ms/token, {pr['kernels_per_token']:.0f} kernels/token")
            for cat, us in pr["by_category_us"].items():
                print(f"  {cat:<18}{us:9.1f} us/token")
            for name, us, count in pr["top_kernels_us_and_count"][:14]:
                print(f"  {us:8.1f} us x{count:<6} {name[:70]}")
    if bw:
        print(f"copy bandwidth measured in this run: {bw / 1e12:.2f} TB/s")
    print(f"{'attention':<12}{'graphs':<8}{'tok/s':>10}{'ms/tok':>9}{'weights TB/s':>14}{'roofline':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['attention']:<12}{str(r['cuda_graphs']):<8}  error: {r['error'][:80]}")
        else:
            print(f"{r['attention']:<12}{str(r['cuda_graphs']):<8}{r['decode_tok_s']:>10.1f}{r['ms_per_token']:>9.2f}"
                  f"{r['achieved_weight_bw_tb_s']:>14.2f}{100 * r.get('share_of_roofline', 0):>9.1f}%")


if __name__ == "__main__":
    main()
