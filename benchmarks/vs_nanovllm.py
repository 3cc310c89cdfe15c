"""weavelm on nano-vllm's own workload (bench.py), steady state, greedy and at temperature 0.6; optional profile.

The workload is drawn exactly as nano-vllm's bench.py draws it: `random.seed(seed)`; 256 prompts of
`randint(100, 1024)` ids `randint(0, 10000)`; then one `max_tokens = randint(100, 1024)` per prompt; ignore_eos.
weavelm loads the same folder (`/tmp/q06`, made by `.peer/make_model.py`) through the public API with default
engine settings (`LLM(model=path)`), runs a full warm-up workload of the same size drawn with seed 1 (no prefix is
shared), then times `LLM.generate` on the seed-0 workload at temperature 0.6 and greedy, interleaved `--repeats`
times, with the prefix cache emptied before each timed run (as the peer's steady-state rerun does).

Run on the GPU machine from the repo root, after `source benchmarks/device_env.sh` and the peer's run:
    python3 benchmarks/vs_nanovllm.py --model /tmp/q06 --peer-json $OUT/peer_nanovllm.json --out $OUT/vs_nanovllm.json
Profile a window of steps of either engine (torch profiler: host time per step, GPU busy/idle, kernel time by
category) instead of timing:
    python3 benchmarks/vs_nanovllm.py --model /tmp/q06 --profile weavelm --out $OUT/profile_weavelm.json
    python3 benchmarks/vs_nanovllm.py --model /tmp/q06 --profile nano-vllm --out $OUT/profile_nanovllm.json
(nano-vllm is imported from `.peer/`, with the FA3 shim; run it through `.peer/run.sh`'s environment.)
CPU smoke test: `python benchmarks/vs_nanovllm.py --model DIR --device cpu --num-seqs 4 --max-len 32`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from random import randint, seed as rseed

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)


def draw_workload(seed: int, num_seqs: int, max_input_len: int, max_output_len: int, min_len: int = 100):
    """bench.py's draws, in bench.py's order: every prompt first, then every max_tokens."""
    rseed(seed)
    prompts = [[randint(0, 10000) for _ in range(randint(min_len, max_input_len))] for _ in range(num_seqs)]
    max_tokens = [randint(min_len, max_output_len) for _ in range(num_seqs)]
    return prompts, max_tokens


def reset_prefix_cache(llm) -> None:
    """Empty weavelm's prefix cache between runs of the same prompts (the peer clears its block manager too)."""
    llm.engine.client.core.scheduler.kv.reset_prefix_cache()


def weavelm_params(max_tokens: list[int], temperature: float):
    from weavelm import SamplingParams
    return [SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=m) for m in max_tokens]


def time_weavelm(args) -> dict:
    from weavelm import LLM

    t0 = time.perf_counter()
    llm = LLM(model=args.model, device=args.device, sets=args.sets)
    startup = time.perf_counter() - t0
    prompts, max_tokens = draw_workload(0, args.num_seqs, args.max_len, args.max_len, args.min_len)
    warm_prompts, warm_max = draw_workload(1, args.num_seqs, args.max_len, args.max_len, args.min_len)
    t0 = time.perf_counter()
    llm.generate(warm_prompts, weavelm_params(warm_max, 0.6))
    warm_s = time.perf_counter() - t0
    total = sum(max_tokens)
    runs = []
    for rep in range(args.repeats):
        for label, temp in (("temperature 0.6", 0.6), ("greedy", 0.0)):
            reset_prefix_cache(llm)
            t0 = time.perf_counter()
            outs = llm.generate(prompts, weavelm_params(max_tokens, temp))
            secs = time.perf_counter() - t0
            got = sum(len(o.outputs[0].token_ids) for o in outs)
            assert got == total, (got, total)
            runs.append({"mode": label, "repeat": rep, "seconds": secs, "tok_per_s": total / secs})
            print(f"weavelm {label}: {total} tok in {secs:.2f} s = {total / secs:.1f} tok/s", flush=True)
    cfg = llm.config.to_dict()
    llm.shutdown()
    best = {m: max(r["tok_per_s"] for r in runs if r["mode"] == m) for m in ("temperature 0.6", "greedy")}
    return {"engine": "weavelm", "startup_s": startup, "warmup_s": warm_s, "out_tokens": total, "runs": runs,
            "best_tok_per_s": best, "config": cfg}


# -- profiling --------------------------------------------------------------------------------------------------
CATEGORIES = (  # first match wins; names are lower-cased kernel names
    ("attention", ("flash", "fmha", "attn", "paged", "decode_kernel", "prefill", "_fwd_")),
    ("kv cache write", ("cache", "store_kv", "reshape_and")),
    ("gemm", ("gemm", "nvjet", "sm90", "cutlass", "xmma", "splitk", "matmul", "cublas")),
    ("norm", ("rms", "norm")),
    ("rotary", ("rotary", "rope", "cos_sin")),
    ("sampling", ("softmax", "argmax", "exponential", "sort", "topk", "distribution", "max_kernel", "gumbel",
                  "sample", "reduce_kernel")),
    ("activation", ("silu", "act_and_mul", "swiglu", "mul_kernel", "gelu")),
    ("memcpy/memset", ("memcpy", "memset")),
)


def categorize(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other elementwise"


def profile_window(step_owner, method: str, first: int, count: int, out: dict):
    """Patch `step_owner.method` so that calls [first, first + count) run under the torch profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    orig = getattr(step_owner, method)
    state = {"n": 0, "prof": None, "t0": 0.0}

    def wrapped(*a, **kw):
        n = state["n"]
        state["n"] += 1
        if n == first:
            torch.cuda.synchronize()
            state["prof"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            state["prof"].__enter__()
            state["t0"] = time.perf_counter()
        result = orig(*a, **kw)
        if n == first + count - 1:
            torch.cuda.synchronize()
            out["wall_s"] = time.perf_counter() - state["t0"]
            state["prof"].__exit__(None, None, None)
            out["prof"] = state["prof"]
        return result

    setattr(step_owner, method, wrapped)


def summarize_profile(prof, wall_s: float, steps: int) -> dict:
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    by_cat: dict[str, float] = {}
    intervals = []
    for e in kernels:
        us = e.device_time if hasattr(e, "device_time") else e.cuda_time
        by_cat[categorize(e.name)] = by_cat.get(categorize(e.name), 0.0) + us
        start = e.time_range.start
        intervals.append((start, start + us))
    intervals.sort()
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in intervals:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    wall_us = wall_s * 1e6
    top = sorted(((k, v) for k, v in by_cat.items()), key=lambda kv: -kv[1])
    return {"steps": steps, "wall_ms_per_step": wall_us / steps / 1e3, "gpu_busy_ms_per_step": busy / steps / 1e3,
            "gpu_idle_share": max(0.0, 1 - busy / wall_us), "num_kernels_per_step": len(kernels) / steps,
            "kernel_ms_per_step": {k: v / steps / 1e3 for k, v in top}}


def profile_engine(args) -> dict:
    prompts, max_tokens = draw_workload(0, args.num_seqs, args.max_len, args.max_len, args.min_len)
    warm_prompts, warm_max = draw_workload(1, args.num_seqs, args.max_len, args.max_len, args.min_len)
    first, count = (int(x) for x in args.profile_steps.split(":"))
    holder: dict = {}
    if args.profile == "weavelm":
        from weavelm import LLM
        llm = LLM(model=args.model, device=args.device, sets=args.sets)
        llm.generate(warm_prompts, weavelm_params(warm_max, 0.6))
        reset_prefix_cache(llm)
        profile_window(llm.engine.client, "get_output", first, count, holder)
        llm.generate(prompts, weavelm_params(max_tokens, args.temperature))
        llm.shutdown()
    else:
        peer = os.path.join(ROOT, ".peer")
        sys.path[:0] = [os.path.join(peer, "nano-vllm"), peer]
        from nanovllm import LLM, SamplingParams
        llm = LLM(args.model, enforce_eager=False, max_model_len=4096)
        llm.generate(warm_prompts, [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m)
                                    for m in warm_max], use_tqdm=False)
        profile_window(llm, "step", first, count, holder)
        llm.generate(prompts, [SamplingParams(temperature=max(args.temperature, 1e-5), ignore_eos=True,
                                              max_tokens=m) for m in max_tokens], use_tqdm=False)
        llm.exit()
    summary = summarize_profile(holder["prof"], holder["wall_s"], count)
    summary.update(engine=args.profile, temperature=args.temperature, window=args.profile_steps)
    try:
        table = holder["prof"].key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        summary["top_cpu_ops"] = table
    except Exception as e:  # the summary above is what matters
        summary["top_cpu_ops"] = f"unavailable: {e}"
    return summary


def print_profile(s: dict) -> None:
    print(f"\n{s['engine']} profile, steps {s['window']} of the timed workload (temperature {s['temperature']}):")
    print(f"  wall {s['wall_ms_per_step']:.2f} ms/step, GPU busy {s['gpu_busy_ms_per_step']:.2f} ms/step, "
          f"GPU idle {100 * s['gpu_idle_share']:.1f}%, {s['num_kernels_per_step']:.0f} kernels/step")
    for k, v in s["kernel_ms_per_step"].items():
        print(f"  {k:<18} {v:7.3f} ms/step")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="/tmp/q06")
    p.add_argument("--device", default="cuda")
    p.add_argument("--set", dest="sets", action="append", default=[], help="engine override (--set style)")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--peer-json", help="the same run's peer_nanovllm.json, for the ratio")
    p.add_argument("--profile", choices=("weavelm", "nano-vllm"))
    p.add_argument("--profile-steps", default="300:40", help="FIRST:COUNT engine steps of the timed run")
    p.add_argument("--temperature", type=float, default=0.6, help="for --profile")
    p.add_argument("--out", default="bench_out/vs_nanovllm.json")
    args = p.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.profile:
        result = profile_engine(args)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(result["top_cpu_ops"])
        print_profile(result)
        return 0
    result = time_weavelm(args)
    result.update(date=time.strftime("%Y-%m-%d %H:%M:%S"), command=" ".join(sys.argv), device=_device_name())
    peer = None
    if args.peer_json and os.path.exists(args.peer_json):
        with open(args.peer_json) as f:
            peer = json.load(f)
        result["peer"] = {k: peer.get(k) for k in ("tok_per_s", "steady_tok_per_s", "device", "out_tokens")}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nnano-vllm workload, {result['device']}, {result['out_tokens']} output tokens")
    print("| system | output tok/s | vs nano-vllm steady state |\n|---|---:|---:|")
    ref = peer.get("steady_tok_per_s") if peer else None
    if peer:
        print(f"| nano-vllm, steady state (temperature 0.6) | {ref:,.0f} | 1.00 |")
    for mode, tps in result["best_tok_per_s"].items():
        print(f"| weavelm, {mode} | {tps:,.0f} | {tps / ref:.2f} |" if ref else f"| weavelm, {mode} | {tps:,.0f} | - |")
    return 0


def _device_name() -> str:
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    sys.exit(main())
