"""Speculative decoding: acceptance and tok/s with and without a proposer, batch 1 (and 8 on the GPU).

Two workloads:
- the real default model (SmolLM2-135M-Instruct, or `--model DIR`) on chat prompts that quote their input (repeat,
  fix or shorten a given paragraph), greedy, proposers `none` and `ngram` (prompt lookup);
- `--shape llama-8b`: a Llama-3.1-8B shape with random weights (dummy loader) and a Llama-3.2-1B-shaped random draft
  (`draft_model`), plus `ngram`: random weights accept almost nothing, so only the per-step overhead is meaningful.

Every configuration's engine is built first; then `--repeats` rounds run every configuration in turn (interleaved,
so a noisy shared machine slows all alike) and the table shows medians. tok/s = generated tokens / wall time of the
`generate` call (prefill included); batch 1 runs the prompts one after another. Greedy outputs are checked to be
identical across proposers (the real model only: random weights make that check meaningless but it still holds).
"mean accepted length" is the engine's cumulative `LLM.get_stats().spec_mean_accepted_length` (all batch sizes and
rounds of that proposer).

  python benchmarks/spec_decode.py --device cpu --batch-sizes 1 --max-tokens 64 --repeats 3 --out spec_cpu.json
  python benchmarks/spec_decode.py --device cuda --batch-sizes 1,8 --max-tokens 256 --repeats 3 --out spec_gpu.json
  python benchmarks/spec_decode.py --device cuda --shape llama-8b --proposers none,ngram,draft_model \\
      --batch-sizes 1,8 --max-tokens 256 --repeats 3 --out spec_gpu_8b.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PARAGRAPHS = [
    "The old lighthouse on the northern cliff was built in 1871 by the harbour board. For more than a century its "
    "keepers climbed one hundred and twelve steps every evening to light the lamp, and the beam could be seen thirty "
    "kilometres out to sea. In 1986 the light was automated and the last keeper moved to the village below.",
    "Our team meeting is moved from Tuesday to Thursday at 10:00 in room 4B. Please bring the quarterly numbers, the "
    "draft of the customer survey and your list of open issues. Lunch will be provided after the meeting, so tell "
    "Anna before Wednesday if you have any dietary requirements.",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make glucose and "
    "oxygen. It takes place mainly in the leaves, inside small structures called chloroplasts, which contain the "
    "green pigment chlorophyll that absorbs light energy.",
    "The library will close early on Friday for the annual inventory. Books due that day can be returned on Monday "
    "without a fine. The reading room on the second floor stays open until 18:00, and the online catalogue is "
    "available as usual throughout the weekend.",
]
TASKS = ["Repeat the following paragraph exactly, word for word:", "Fix any typos in this paragraph and return it:"]
DRAFT_SHAPE = dict(arch="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=5e5,
                   tie_word_embeddings=True, max_position_embeddings=131072,
                   rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def spec_section(proposer: str, args, draft: str | None) -> dict | None:
    if proposer == "none":
        return None
    if proposer == "ngram":
        return {"name": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": 1, "prompt_lookup_max": 4}
    return {"name": "draft_model", "num_speculative_tokens": args.k, "model": draft}


def real_prompts(llm, n: int) -> list:
    tok = llm.get_tokenizer()
    out = []
    for i in range(n):
        para, task = PARAGRAPHS[i % len(PARAGRAPHS)], TASKS[(i // len(PARAGRAPHS)) % len(TASKS)]
        msg = [{"role": "user", "content": f"{task}\n\n{para}"}]
        out.append(tok.apply_chat_template(msg, tokenize=False, add_generation_prompt=True))
    return out


def build(args, proposer: str, model: str | None, draft: str | None):
    from weavelm import LLM

    kw = dict(device=args.device, dtype=args.dtype, speculative=spec_section(proposer, args, draft),
              enforce_eager=args.enforce_eager, scheduler={"max_num_seqs": max(args.batch_sizes)})
    if args.shape:
        kw.update(loader="dummy", max_model_len=2048)
    if args.shape or args.device == "cuda":  # every engine stays loaded: each gets a fixed pool, not 90% of the GPU
        kw.update(cache={"num_blocks": args.num_blocks})
    return LLM(model=model, **kw)


def measure(llm, prompts: list, batch: int, args) -> tuple[float, int, list]:
    from weavelm import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=bool(args.shape))
    groups = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    before = llm.get_stats()
    t0 = time.perf_counter()
    outs = [o for g in groups for o in llm.generate(g, params, use_tqdm=False)]
    wall = time.perf_counter() - t0
    after = llm.get_stats()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    drafts = after.spec_num_draft_tokens - before.spec_num_draft_tokens
    accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    return wall, tokens, [o.outputs[0].token_ids for o in outs], (drafts, accepted,
                                                                  after.spec_proposer_time_s - before.spec_proposer_time_s)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.machine()
    return f"{name} ({os.cpu_count()} cores)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--model", default=None, help="model directory (default: the default model)")
    p.add_argument("--shape", default=None, choices=[None, "llama-8b", "tiny"],
                   help="random-weight target shape (tiny: a smoke test of this script, its own draft shape)")
    p.add_argument("--proposers", default=None, help="comma list of none, ngram, draft_model "
                                                      "(default: none,ngram; with --shape: none,ngram,draft_model)")
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--batch-sizes", default="1", help="comma list, e.g. 1,8")
    p.add_argument("--num-prompts", type=int, default=0, help="prompts per measurement (default: max batch size, "
                                                                "at least 2)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-blocks", type=int, default=512, help="KV blocks per engine with --shape or on CUDA (all engines stay loaded)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for any configuration")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default="spec_decode.json")
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    proposers = (args.proposers or ("none,ngram,draft_model" if args.shape else "none,ngram")).split(",")
    n_prompts = args.num_prompts or max(2, max(args.batch_sizes))

    tmp = tempfile.mkdtemp(prefix="spec_bench_")
    model = args.model
    draft = None
    if args.shape:
        from gpu_decode import SHAPES, write_config

        model = write_config(args.shape, os.path.join(tmp, "target"))
        SHAPES["llama-1b-draft"] = DRAFT_SHAPE
        draft = write_config("tiny" if args.shape == "tiny" else "llama-1b-draft", os.path.join(tmp, "draft"))
    llms = {name: build(args, name, model, draft) for name in proposers}
    first = llms[proposers[0]]
    if args.shape:
        vocab = SHAPES[args.shape]["vocab_size"]
        prompts = [{"prompt_token_ids": [(7 * i + 13 * j) % (vocab - 100) + 100 for j in range(160)]}
                   for i in range(n_prompts)]
    else:
        prompts = real_prompts(first, n_prompts)
    warm = prompts[:1]
    for llm in llms.values():  # warm up (CUDA graphs, allocator, first-call costs)
        from weavelm import SamplingParams
        llm.generate(warm, SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)

    runs: dict[tuple[str, int], list] = {}
    outputs: dict[tuple[str, int], list] = {}
    for rep in range(args.repeats):
        for batch in args.batch_sizes:
            for name in proposers:
                wall, tokens, outs, (drafts, accepted, ptime) = measure(llms[name], prompts, batch, args)
                runs.setdefault((name, batch), []).append((tokens / wall, drafts, accepted, ptime, wall))
                outputs[(name, batch)] = outs
                print(f"  round {rep + 1} batch {batch} {name}: {tokens / wall:.2f} tok/s", flush=True)

    rows = []
    for batch in args.batch_sizes:
        base = statistics.median(r[0] for r in runs[(proposers[0], batch)])
        for name in proposers:
            rs = runs[(name, batch)]
            tps = statistics.median(r[0] for r in rs)
            drafts, accepted = sum(r[1] for r in rs), sum(r[2] for r in rs)
            rows.append({"proposer": name, "batch": batch, "tok_s": tps, "ratio": tps / base,
                         "acceptance": accepted / drafts if drafts else None, "draft_tokens": drafts,
                         "proposer_time_s": statistics.median(r[3] for r in rs),
                         "mean_accepted_length": llms[name].get_stats().spec_mean_accepted_length or None,
                         "identical_to_first": outputs[(name, batch)] == outputs[(proposers[0], batch)],
                         "tok_s_all": [r[0] for r in rs]})
    device = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    print(f"\n{args.shape or (model or 'default model')} on {device}, {args.dtype}, k={args.k}, "
          f"{args.max_tokens} tokens, {n_prompts} prompts, median of {args.repeats}")
    print("| proposer | batch | tok/s | vs none | acceptance | mean accepted length | drafts | proposer s "
          "| same greedy output |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.1%}"
        mal = "-" if r["mean_accepted_length"] is None else f"{r['mean_accepted_length']:.2f}"
        print(f"| {r['proposer']} | {r['batch']} | {r['tok_s']:.2f} | {r['ratio']:.2f}x | {acc} | {mal} | "
              f"{r['draft_tokens']} | {r['proposer_time_s']:.3f} | {r['identical_to_first']} |")
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "device": device, "rows": rows}, f, indent=1)
    for llm in llms.values():
        llm.shutdown()
    gc.collect()


if __name__ == "__main__":
    main()
