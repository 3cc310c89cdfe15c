"""Pipeline-parallel timeline on the CPU: 2 stages, 4 micro-batches, per-stage busy time.

    python benchmarks/pp_timeline.py --out bench_out/pp_timeline.json

A Llama-shaped model (dummy loader, random fp32 weights; `--hidden`, `--layers`) runs with
`pipeline_parallel_size=2` (multiproc, gloo, one torch thread per stage). `--requests` decode-heavy requests with a
step budget of `--requests / --micro-batches` tokens make the scheduler form `--micro-batches` micro-batches that
cycle through the two stages; the engine core keeps one launched step per stage in flight (its batch queue, depth 2).
The same engine is then run with the queue depth forced to 1 (`max_concurrent_batches = 1`: one step at a time, the
stages take turns) as the no-overlap baseline. Each stage records the compute span of every step (after receiving
from the previous stage, before sending on: `weavelm/plugins/workers/pipeline_stage.py`); busy time is the sum of
the spans inside the generate() window. Prints a table, an ASCII timeline of a slice of the run, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_model(path: str, hidden: int, layers: int) -> str:
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=1024,
                tie_word_embeddings=False, architectures=["LlamaForCausalLM"]).save_pretrained(path)
    return path


def run(llm, args: argparse.Namespace, depth: int) -> dict:
    from weavelm import SamplingParams

    core = llm.llm_engine.client.core  # in-process engine core
    core.max_concurrent_batches = depth
    prompts = [{"prompt_token_ids": [(7 * i + j) % 4000 + 3 for j in range(args.prompt_len)]}
               for i in range(args.requests)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:args.micro_batches], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    llm.collective_rpc("pipeline_timeline")  # forget the warm-up's spans
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    end = time.perf_counter()
    spans = llm.collective_rpc("pipeline_timeline")  # rank r = stage r (tensor_parallel_size 1)
    wall = end - start
    stages = []
    for stage, stage_spans in enumerate(spans):
        inside = [s for s in stage_spans if s.start >= start and s.end <= end]
        busy = sum(s.end - s.start for s in inside)
        stages.append({"stage": stage, "steps": len(inside), "busy_s": busy, "busy_frac": busy / wall,
                       "mean_step_ms": 1e3 * busy / max(1, len(inside)),
                       "mean_recv_wait_ms": 1e3 * sum(s.recv_wait for s in inside) / max(1, len(inside)),
                       "spans": [(s.start - start, s.end - start, s.num_tokens) for s in inside]})
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    both = overlap([(a, b) for a, b, _ in stages[0]["spans"]], [(a, b) for a, b, _ in stages[1]["spans"]])
    return {"queue_depth": depth, "wall_s": wall, "output_tokens": tokens, "tok_s": tokens / wall,
            "both_busy_s": both, "both_busy_frac": both / wall, "stages": stages}


def overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Seconds during which a span of `a` and a span of `b` run at once (each list sorted, non-overlapping)."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def ascii_timeline(result: dict, t0: float, width: int, seconds: float) -> list[str]:
    lines = []
    for st in result["stages"]:
        row = [" "] * width
        for a, b, _ in st["spans"]:
            if b < t0 or a > t0 + seconds:
                continue
            lo = max(0, int((a - t0) / seconds * width))
            hi = min(width, max(lo + 1, int((b - t0) / seconds * width)))
            for i in range(lo, hi):
                row[i] = "#"
        lines.append(f"stage {st['stage']} |{''.join(row)}|")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=4)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args()

    from weavelm import LLM

    budget = max(1, args.requests // args.micro_batches)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(tmp, args.hidden, args.layers)
        llm = LLM(model=path, dtype="float32", device="cpu", loader="dummy", attention="torch_ref",
                  pipeline_parallel_size=2, num_threads=1, cache={"num_blocks": 512, "block_size": 16},
                  scheduler={"max_num_seqs": args.requests, "max_num_batched_tokens": budget})
        try:
            results = [run(llm, args, 2), run(llm, args, 1)]
        finally:
            llm.shutdown()
    load = os.getloadavg()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(),
            "cores": os.cpu_count(), "loadavg": load, "args": vars(args), "step_token_budget": budget}
    print(f"# {meta['date']}  CPU: {meta['cpu']} ({meta['cores']} cores, load average {load[0]:.1f})")
    print(f"# Llama {args.layers} layers x hidden {args.hidden} fp32, 2 stages, {args.requests} requests "
          f"({args.prompt_len}-token prompts, {args.output_len} output tokens), step budget {budget} tokens "
          f"-> {args.micro_batches} micro-batches")
    print("| queue depth | stage | steps | busy s | busy % of wall | both stages busy % | mean step ms | "
          "mean recv wait ms | wall s | output tok/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        for st in r["stages"]:
            print(f"| {r['queue_depth']} | {st['stage']} | {st['steps']} | {st['busy_s']:.2f} | "
                  f"{100 * st['busy_frac']:.0f}% | {100 * r['both_busy_frac']:.0f}% | {st['mean_step_ms']:.1f} | "
                  f"{st['mean_recv_wait_ms']:.1f} | {r['wall_s']:.2f} | {r['tok_s']:.1f} |")
    for r in results:
        mid = r["wall_s"] / 2
        print(f"\nqueue depth {r['queue_depth']}: 0.5 s of the run from t = {mid:.2f} s ('#' = computing)")
        for line in ascii_timeline(r, mid, 100, 0.5):
            print(line)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
