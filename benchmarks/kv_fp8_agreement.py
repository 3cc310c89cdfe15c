"""fp8 KV cache vs the unquantized one on the default model (SmolLM2-135M-Instruct, its GGUF): greedy tokens of chat
prompts (position-wise agreement, identical outputs, common prefix), teacher-forced top-1 agreement (each position's
most likely token given the unquantized run's tokens before it), and the KV block count at the same memory.

Issue 28's bar: `kv_cache_dtype="fp8"` agrees with the bf16 KV cache on >= 90% of the tokens of 16 chat prompts x 32
tokens. `--dtype bfloat16` runs that comparison literally (bf16 model, bf16 KV vs fp8 KV); the default `float32` is
the CPU engine's default (fp32 KV vs fp8 KV). Prints a table, writes JSON.

    python benchmarks/kv_fp8_agreement.py --dtype float32 --out bench_out/kv_fp8_agreement.json
    python benchmarks/kv_fp8_agreement.py --dtype bfloat16 --device cuda --attention triton
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

CHAT_PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
    "Give me three tips for learning Python.", "What is a list in Python?", "Tell me a short story about a robot.",
    "How do airplanes fly?", "Summarize Romeo and Juliet.", "What is 12 times 12?", "Name three planets.",
    "Why is the sky blue?", "What does a CPU do?", "Translate 'good morning' into French.",
    "What is the boiling point of water?", "Suggest a name for a cat.", "What is machine learning?",
]


def chat_token_ids(tokenizer, prompts: list[str]) -> list[dict]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    return [{"prompt_token_ids": tokenizer.encode(t, add_special_tokens=False)} for t in texts]


def agreement(got: list[list[int]], ref: list[list[int]]) -> dict:
    """Position-wise agreement (share of positions i where got[i] == ref[i]), identical outputs, common prefix."""
    total = sum(len(r) for r in ref)
    same_pos = sum(a == b for g, r in zip(got, ref) for a, b in zip(g, r))
    prefix = sum(next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), len(r)) for g, r in zip(got, ref))
    return {"positionwise": same_pos / total, "identical_outputs": sum(g == r for g, r in zip(got, ref)),
            "common_prefix": prefix / total, "tokens": total}


def top1_given(llm, prompts: list[dict], continuations: list[list[int]]) -> list[list[int]]:
    """Teacher forcing: for each prompt + continuation, the engine's most likely token at every continuation position
    given the continuation's tokens before it (from `prompt_logprobs`, one prefill per prompt)."""
    from weavelm import SamplingParams

    full = [{"prompt_token_ids": p["prompt_token_ids"] + c} for p, c in zip(prompts, continuations)]
    outs = llm.generate(full, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1), use_tqdm=False)
    # prompt_logprobs[i] scores position i given the tokens before it: its rank-1 entry is the engine's choice there
    return [[min(row, key=lambda t: row[t].rank) for row in o.prompt_logprobs[len(p["prompt_token_ids"]):]]
            for p, o in zip(prompts, outs)]


def run(kv_cache_dtype: str, args, prompts: list[dict] | None = None,
        reference: list[list[int]] | None = None) -> dict:
    """Greedy outputs of the default model with this KV cache dtype, and its teacher-forced top-1 tokens along
    `reference` (default: its own outputs)."""
    from weavelm import LLM, SamplingParams

    kwargs = dict(device=args.device, dtype=args.dtype, kv_cache_dtype=kv_cache_dtype,
                  cache={"cpu_kv_cache_gib": args.kv_gib} if args.device == "cpu" else {})
    if args.attention:
        kwargs["attention"] = args.attention
    llm = LLM(**kwargs)
    prompts = prompts or chat_token_ids(llm.get_tokenizer(), CHAT_PROMPTS[:args.prompts])
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    stats = llm.get_stats()
    tokens = [o.outputs[0].token_ids for o in outs]
    forced = top1_given(llm, prompts, reference or tokens)
    llm.shutdown()  # the next engine sizes its pool from the same free memory
    del llm, outs
    gc.collect()
    if args.device == "cuda":
        import torch

        torch.cuda.empty_cache()
    return {"kv_cache_dtype": kv_cache_dtype, "tokens": tokens, "teacher_forced": forced,
            "kv_storage": stats.kv_cache_dtype, "num_total_blocks": stats.num_total_blocks,
            "kv_block_bytes": stats.kv_block_bytes, "seconds": seconds, "prompts": prompts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--attention", default=None, help="attention backend (default: auto)")
    ap.add_argument("--fp8", default="fp8", choices=("fp8", "fp8_e4m3", "fp8_e5m2"))
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--kv-gib", type=float, default=0.25, help="cache.cpu_kv_cache_gib (CPU)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench_out/kv_fp8_agreement.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    base = run("auto", args)
    fp8 = run(args.fp8, args, base["prompts"], base["tokens"])
    forced = sum(a == b for f, r in zip(fp8["teacher_forced"], base["tokens"]) for a, b in zip(f, r))
    self_forced = sum(a == b for f, r in zip(base["teacher_forced"], base["tokens"]) for a, b in zip(f, r))
    result = {"model": "default (SmolLM2-135M-Instruct Q4_1 GGUF)", "dtype": args.dtype, "device": args.device,
              "attention": args.attention or "auto", "prompts": args.prompts, "max_tokens": args.tokens,
              **agreement(fp8["tokens"], base["tokens"]),
              "teacher_forced_top1": forced / sum(map(len, base["tokens"])),
              "baseline_teacher_forced_top1": self_forced / sum(map(len, base["tokens"])),
              "blocks": {base["kv_storage"]: base["num_total_blocks"], fp8["kv_storage"]: fp8["num_total_blocks"]},
              "block_bytes": {base["kv_storage"]: base["kv_block_bytes"], fp8["kv_storage"]: fp8["kv_block_bytes"]},
              "seconds": {"auto": round(base["seconds"], 2), args.fp8: round(fp8["seconds"], 2)}}
    print(f"{args.prompts} chat prompts x {args.tokens} tokens, {args.dtype} on {args.device}: {args.fp8} KV vs "
          f"{base['kv_storage']} KV")
    print(f"  position-wise agreement {result['positionwise']:.1%}, identical outputs "
          f"{result['identical_outputs']}/{args.prompts}, common prefix {result['common_prefix']:.1%}")
    print(f"  teacher-forced top-1 agreement along the {base['kv_storage']} outputs: "
          f"{result['teacher_forced_top1']:.1%} (the {base['kv_storage']} engine itself, prefill vs decode: "
          f"{result['baseline_teacher_forced_top1']:.1%})")
    print(f"  KV blocks at the same memory: {result['blocks']} (bytes per block {result['block_bytes']})")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
