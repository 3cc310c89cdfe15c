"""Where an engine step's time goes: scheduler, runner state update, input preparation, forward, sampling,
scheduler update, frontend. Wraps the stages with timers (syncing the device around the forward) and runs the
nano-vllm workload; prints ms per step for each stage and writes JSON.

  python benchmarks/step_profile.py --model-dir DIR --set attention=triton --num-prompts 256 --out prof.json
  python benchmarks/step_profile.py --shape qwen3-0.6b --loader dummy ...   # config-only model, random weights
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))


def timed(store, key, fn, sync=None):
    def wrapper(*a, **kw):
        if sync:
            sync()
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            if sync:
                sync()
            store[key] += time.perf_counter() - t
    return wrapper


def main() -> None:
    from gpu_decode import write_config

    from weavelm import LLM
    from weavelm.bench.runner import run_workload, warmup
    from weavelm.bench.workload import random_workload

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir")
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--loader", default=None)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", default="100:1024")
    ap.add_argument("--output-len", default="100:1024")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default="step_profile.json")
    ap.add_argument("--cprofile", action="store_true", help="also print the top functions by own time")
    args = ap.parse_args()
    model = args.model_dir or write_config(args.shape, tempfile.mkdtemp(prefix="weavelm_shape_"))
    loader = args.loader or ("safetensors" if args.model_dir else "dummy")
    llm = LLM(model=model, dtype=args.dtype, device=args.device, loader=loader, sets=args.sets)
    core = llm.engine.client.core
    runner = core.executor.worker.runner
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    t: dict[str, float] = collections.defaultdict(float)
    core.scheduler.schedule = timed(t, "schedule", core.scheduler.schedule)
    core.scheduler.update_from_output = timed(t, "update_from_output", core.scheduler.update_from_output)
    runner._update_states = timed(t, "runner.update_states", runner._update_states)
    runner._prepare_inputs = timed(t, "runner.prepare_inputs", runner._prepare_inputs, sync)
    runner.run_model = timed(t, "forward (eager)", runner.run_model, sync)
    if runner.graphs is not None:
        runner.graphs.run = timed(t, "forward (graph)", runner.graphs.run, sync)
    import weavelm.plugins.workers.model_runner as mr

    mr.sample = timed(t, "sample (+sync)", mr.sample, sync)
    core.executor.execute_model = timed(t, "execute_model (total)", core.executor.execute_model, sync)
    import weavelm.core.llm_engine as le

    le.add_tokens_batch = timed(t, "frontend.detokenize", le.add_tokens_batch)
    llm.engine._process = timed(t, "frontend.process", llm.engine._process)
    llm.engine.client.get_output = timed(t, "core.step (total)", llm.engine.client.get_output)
    tok = llm.engine.tokenizer
    print(f"tokenizer: {type(tok).__name__ if tok is not None else None}, "
          f"fast backend: {getattr(tok, '_tokenizer', None) is not None}, "
          f"clean_up_tokenization_spaces: {getattr(tok, 'clean_up_tokenization_spaces', None)}")
    warmup(llm.engine)
    t.clear()
    lo, hi = (int(x) for x in args.input_len.split(":"))
    olo, ohi = (int(x) for x in args.output_len.split(":"))
    wl = random_workload(args.num_prompts, (lo, hi), (olo, ohi), llm.engine.vocab_size, llm.engine.max_model_len, seed=0)
    if args.cprofile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        rec = prof.runcall(run_workload, llm.engine, wl)
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    else:
        rec = run_workload(llm.engine, wl)
    steps = rec.num_steps
    accounted = t["schedule"] + t["execute_model (total)"] + t["update_from_output"]
    t["frontend + other"] = rec.wall_s - accounted
    tp = rec.throughput()
    rows = {k: {"total_s": v, "ms_per_step": 1000 * v / steps} for k, v in sorted(t.items())}
    out = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "sets": args.sets,
           "steps": steps, "wall_s": rec.wall_s, "output_tok_s": tp["output_tok_s"], "stages": rows}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"{out['device']}  sets={args.sets}  steps={steps}  wall={rec.wall_s:.2f}s  "
          f"output tok/s={tp['output_tok_s']:.0f} (timers add syncs)")
    for k, r in rows.items():
        print(f"  {k:<26}{r['ms_per_step']:>8.3f} ms/step {r['total_s']:>8.2f} s")


if __name__ == "__main__":
    main()
