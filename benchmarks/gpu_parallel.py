"""GPU scaling of the parallel layouts (TP, PP, DP, EP) on one multi-GPU host.

    python benchmarks/gpu_parallel.py --model llama8b --layouts "1 tp=2 pp=2 tp=2,pp=2" --out $OUT/parallel.json

A layout is comma-separated `key=value` items of vLLM's `LLM(...)` keywords in short form: `tp` ->
tensor_parallel_size, `pp` -> pipeline_parallel_size, `dp` -> data_parallel_size, `ep` (no value) ->
enable_expert_parallel=True, `backend=ray` -> distributed_executor_backend; `1` is one GPU. Each layout runs in its own
child process (GPU memory is fully released between them) on a model of the chosen shape (dummy loader, random bf16
weights): nano-vllm's bench.py workload (`--num-prompts` requests, prompts and outputs 100..1024 tokens,
temperature 0.6, ignore_eos) timed after a same-sized warm-up drawn with another seed, and batch-1 decode (a
128-token prompt, 256 tokens, best of 2). A layout the engine refuses or that fails is a row with its error, and the
run goes on. Prints a table (throughput vs the first layout) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SHAPES = {
    "llama8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
                    hidden_act="silu", tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
                    torch_dtype="bfloat16"),
    "qwen3_30b_a3b": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048,
                          intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                          vocab_size=151936, rope_theta=1000000.0, max_position_embeddings=40960,
                          rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False, bos_token_id=151643,
                          eos_token_id=151645, torch_dtype="bfloat16"),
}
KEYS = {"tp": "tensor_parallel_size", "pp": "pipeline_parallel_size", "dp": "data_parallel_size",
        "backend": "distributed_executor_backend"}


def layout_kwargs(layout: str) -> dict:
    """`"tp=2,pp=2"` -> {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}; `"1"` -> {}."""
    kwargs: dict = {}
    for item in filter(None, layout.split(",")):
        if item == "1":
            continue
        if item == "ep":
            kwargs["enable_expert_parallel"] = True
            continue
        key, _, value = item.partition("=")
        kwargs[KEYS[key]] = value if key == "backend" else int(value)
    return kwargs


def num_gpus(kwargs: dict) -> int:
    return (kwargs.get("tensor_parallel_size", 1) * kwargs.get("pipeline_parallel_size", 1)
            * kwargs.get("data_parallel_size", 1))


def workload(seed: int, num: int, lo: int, hi: int) -> tuple[list[list[int]], list[int]]:
    """bench.py's draw: prompt lengths and ids, then max_tokens per sequence."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(lo, hi))] for _ in range(num)]
    outs = [rng.randint(lo, hi) for _ in range(num)]
    return prompts, outs


def child(args: argparse.Namespace) -> dict:
    import torch

    from weavelm import LLM, SamplingParams

    kwargs = layout_kwargs(args.child)
    llm = LLM(model=args.model_dir, dtype="bfloat16", device="cuda", loader="dummy", max_model_len=4096,
              attention=args.attention, **kwargs)
    result = {"layout": args.child, "gpus": num_gpus(kwargs), "card": torch.cuda.get_device_name()}

    def run(seed: int) -> tuple[int, float]:
        prompts, outs = workload(seed, args.num_prompts, 100, 1024)
        params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in outs]
        start = time.perf_counter()
        done = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in done), time.perf_counter() - start

    run(1)  # warm-up of the same shape, other seed
    tokens, wall = run(0)
    result.update(output_tokens=tokens, wall_s=wall, output_tok_s=tokens / wall)
    best = 0.0
    for _ in range(2):
        stamps = [time.perf_counter() for _ in llm.stream({"prompt_token_ids": list(range(1, 129))},
                                                          SamplingParams(max_tokens=256, temperature=0.0,
                                                                         ignore_eos=True))]
        best = max(best, (len(stamps) - 1) / (stamps[-1] - stamps[0]))
    result["batch1_decode_tok_s"] = best
    llm.shutdown()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SHAPES), default="llama8b")
    ap.add_argument("--layouts", default="1 tp=2 pp=2", help="space-separated layouts (see above)")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per layout")
    ap.add_argument("--model-dir")
    ap.add_argument("--out", default="bench_out/gpu_parallel.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    args.model_dir = args.model_dir or tempfile.mkdtemp(prefix=f"weavelm_{args.model}_")
    with open(os.path.join(args.model_dir, "config.json"), "w") as f:
        json.dump(SHAPES[args.model], f)
    rows = []
    for layout in args.layouts.split():
        cmd = [sys.executable, __file__, "--child", layout, "--model-dir", args.model_dir, "--num-prompts",
               str(args.num_prompts), "--attention", args.attention]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            rows.append(json.loads(line[-1][7:]) if line else {"layout": layout, "error": proc.stderr[-3000:]})
        except subprocess.TimeoutExpired:
            rows.append({"layout": layout, "error": f"timed out after {args.timeout:.0f} s"})
        print(rows[-1], flush=True)
    base = next((r for r in rows if "error" not in r), None)
    print(f"\n{args.model} shape, bf16, dummy weights, nano-vllm workload ({args.num_prompts} requests, 100..1024 "
          f"in/out, temperature 0.6)")
    print("| layout | GPUs | card | output tok/s | vs first | per GPU vs first | batch-1 decode tok/s |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            last = r["error"].strip().splitlines()[-1:] or [""]
            print(f"| {r['layout']} | | error: {last[0][:160]} | | | | |")
            continue
        ratio = r["output_tok_s"] / base["output_tok_s"]
        per_gpu = ratio * base["gpus"] / r["gpus"]
        print(f"| {r['layout']} | {r['gpus']} | {r['card']} | {r['output_tok_s']:,.0f} | {ratio:.2f}x | "
              f"{per_gpu:.2f}x | {r['batch1_decode_tok_s']:.1f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "num_prompts": args.num_prompts, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
