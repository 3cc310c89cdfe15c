"""Tensor-parallel scaling on the GPU machine: a Llama-3.1-8B-shaped model (dummy loader, random bf16 weights),
TP=1 (uniproc) vs TP=N (multiproc), on nano-vllm's bench.py workload and at batch-1 decode.

    python benchmarks/tp_scaling.py --tp 1,2 --out $OUT/tp_scaling.json

Each configuration runs in its own child process (so GPU memory is fully released between them). Throughput is
timed after a warm-up workload of the same shape drawn with another seed (no shared prefix); batch-1 decode streams
one request and times the gaps between tokens.
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
LLAMA_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
                tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16")


def workload(seed: int, num: int, lo: int, hi: int) -> tuple[list[list[int]], list[int]]:
    """bench.py's draw: prompt lengths and ids, then max_tokens per sequence."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(lo, hi))] for _ in range(num)]
    outs = [rng.randint(lo, hi) for _ in range(num)]
    return prompts, outs


def child(args: argparse.Namespace, tp: int) -> dict:
    import torch

    from weavelm import LLM, SamplingParams

    executor = {"name": "uniproc"} if tp == 1 else {"name": "multiproc", "tensor_parallel_size": tp}
    llm = LLM(model=args.model_dir, dtype="bfloat16", device="cuda", loader="dummy", executor=executor,
              max_model_len=4096, attention=args.attention)
    result = {"tp": tp, "card": torch.cuda.get_device_name(), "attention": llm.engine.client.model_info["attention"]}

    def run(seed: int) -> tuple[int, float]:
        prompts, outs = workload(seed, args.num_prompts, 100, 1024)
        params = [SamplingParams(temperature=args.temperature, ignore_eos=True, max_tokens=m) for m in outs]
        start = time.perf_counter()
        done = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        wall = time.perf_counter() - start
        return sum(len(o.outputs[0].token_ids) for o in done), wall

    run(1)  # warm-up of the same shape, other seed
    tokens, wall = run(0)
    result.update(output_tokens=tokens, wall_s=wall, output_tok_s=tokens / wall)
    prompt = {"prompt_token_ids": list(range(1, 129))}
    best = 0.0
    for _ in range(2):
        stamps = [time.perf_counter() for _ in llm.stream(prompt, SamplingParams(max_tokens=256, temperature=0.0,
                                                                                    ignore_eos=True))]
        best = max(best, (len(stamps) - 1) / (stamps[-1] - stamps[0]))
    result["batch1_decode_tok_s"] = best
    llm.shutdown()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--model-dir")
    ap.add_argument("--out", default="bench_out/tp_scaling.json")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args, args.child)), flush=True)
        return
    args.model_dir = args.model_dir or tempfile.mkdtemp(prefix="weavelm_llama8b_")
    with open(os.path.join(args.model_dir, "config.json"), "w") as f:
        json.dump(LLAMA_8B, f)
    rows = []
    for tp in [int(t) for t in args.tp.split(",")]:
        cmd = [sys.executable, __file__, "--child", str(tp), "--model-dir", args.model_dir, "--num-prompts",
               str(args.num_prompts), "--temperature", str(args.temperature), "--attention", args.attention]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        rows.append(json.loads(line[-1][7:]) if line else {"tp": tp, "error": proc.stderr[-3000:]})
        print(rows[-1], flush=True)
    base = next((r for r in rows if r.get("tp") == 1 and "error" not in r), None)
    print(f"\nLlama-3.1-8B shape, bf16, dummy weights, nano-vllm workload ({args.num_prompts} requests, 100..1024 "
          f"in/out, temperature {args.temperature})")
    print("| TP | card | attention | output tok/s | vs TP=1 | batch-1 decode tok/s |")
    print("|---:|---|---|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['tp']} | error: {r['error'][-200:]!r} |")
            continue
        ratio = r["output_tok_s"] / base["output_tok_s"] if base else float("nan")
        print(f"| {r['tp']} | {r['card']} | {r['attention']} | {r['output_tok_s']:,.0f} | {ratio:.2f}x | "
              f"{r['batch1_decode_tok_s']:.1f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "num_prompts": args.num_prompts, "temperature": args.temperature}, f, indent=1)


if __name__ == "__main__":
    main()
