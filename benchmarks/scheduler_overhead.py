"""CPU cost of the scheduler per engine step: `schedule()` + `update_from_output()`, no model.

Runs each registered scheduler (or --schedulers) with 64, 256 and 1024 running requests (--running) and times only
the two scheduler calls; the runner's output is built by hand outside the timed region. Scenarios:
  decode  every request is decoding (steady state after the prompts were prefilled)
  churn   as decode, but about 1/32 of the requests finish each step and as many new ones arrive, sharing a
          256-token system prompt (prefix-cache hits, prefill chunks, block frees and registrations)

    python benchmarks/scheduler_overhead.py [--steps 200] [--out results.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from weavelm.core.interfaces import SchedulerContext  # noqa: E402
from weavelm.core.outputs import ModelRunnerOutput  # noqa: E402
from weavelm.core.registry import Registry  # noqa: E402
from weavelm.core.request import Request, SamplingParams  # noqa: E402

BLOCK_SIZE = 16
PROMPT = 128
SYSTEM_PROMPT = 256


class Workload:
    def __init__(self, name: str, running: int, steps: int, scenario: str):
        self.scenario = scenario
        self.running = running
        self.counter = 0
        max_len = SYSTEM_PROMPT + PROMPT + steps + 64
        num_blocks = 2 * running * (-(-max_len // BLOCK_SIZE)) + 64
        cls = Registry.load().get("scheduler", name)
        opts = cls.Options(max_num_seqs=running, max_num_batched_tokens=max(8192, 2 * running))
        self.sched = cls(opts, SchedulerContext(num_blocks=num_blocks, block_size=BLOCK_SIZE,
                                                max_model_len=max_len, enable_prefix_caching=True))
        self.system = [(7 * i) % 30000 + 3 for i in range(SYSTEM_PROMPT)]
        for _ in range(running):
            self.add(max_tokens=10**6)

    def add(self, max_tokens: int) -> None:
        i = self.counter
        self.counter += 1
        body = [(i * 131 + 17 * j) % 30000 + 3 for j in range(PROMPT)]
        prompt = (self.system + body) if self.scenario == "churn" else body
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, priority=i % 4)
        self.sched.add_request(Request(f"r{i}", prompt, sp, eos_token_id=None))

    def runner_output(self, so) -> ModelRunnerOutput:
        reqs = self.sched.requests
        ids, sampled = [], []
        for rid in so.num_scheduled_tokens:
            r = reqs[rid]
            ids.append(rid)
            sampled.append([5] if r.num_computed_tokens >= r.num_tokens else [])
        return ModelRunnerOutput(ids, {r: i for i, r in enumerate(ids)}, sampled, None)

    def step(self) -> tuple[float, float, int]:
        """One step; returns (wall seconds, CPU seconds) of the scheduler calls and the number scheduled."""
        if self.scenario == "churn":
            for r in self.sched.running[: max(1, self.running // 32)]:
                r.sampling_params.max_tokens = r.num_output_tokens + 1  # finishes this step
        w0, c0 = time.perf_counter(), time.process_time()
        so = self.sched.schedule()
        w1, c1 = time.perf_counter(), time.process_time()
        ro = self.runner_output(so)
        w2, c2 = time.perf_counter(), time.process_time()
        outs = self.sched.update_from_output(so, ro)
        w3, c3 = time.perf_counter(), time.process_time()
        if self.scenario == "churn":
            for _ in range(sum(1 for o in outs if o.finished)):
                self.add(max_tokens=10**6)
        return (w1 - w0) + (w3 - w2), (c1 - c0) + (c3 - c2), len(so.num_scheduled_tokens)


def measure(name: str, running: int, steps: int, scenario: str) -> dict:
    wl = Workload(name, running, steps, scenario)
    for _ in range(200):  # prefill everything, reach the steady state
        wl.step()
        if len(wl.sched.running) == running and all(r.num_computed_tokens >= r.num_prompt_tokens
                                                    for r in wl.sched.running):
            break
    for _ in range(5):
        wl.step()
    gc.collect()
    walls, cpu, batch = [], 0.0, []
    for _ in range(steps):
        w, c, n = wl.step()
        walls.append(w)
        cpu += c
        batch.append(n)
    stats = wl.sched.get_stats()
    return {"scheduler": name, "scenario": scenario, "running": running, "steps": steps,
            "mean_batch": statistics.mean(batch), "cpu_ms_per_step": 1e3 * cpu / steps,
            "wall_ms_median": 1e3 * statistics.median(walls), "wall_ms_p90": 1e3 * sorted(walls)[int(0.9 * steps)],
            "us_per_request": 1e6 * statistics.median(walls) / max(statistics.mean(batch), 1),
            "prefix_hit_rate": round(stats.prefix_hit_rate, 3)}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedulers", default=None, help="comma list; default: fcfs,priority")
    ap.add_argument("--running", default="64,256,1024")
    ap.add_argument("--scenarios", default="decode,churn")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    names = args.schedulers.split(",") if args.schedulers else ["fcfs", "priority"]
    rows = [measure(n, int(r), args.steps, s) for s in args.scenarios.split(",") for n in names
            for r in args.running.split(",")]
    header = ("| scheduler | scenario | running | CPU ms/step (mean) | wall ms/step (median) | wall p90 "
              "| us/request (median) |")
    print(f"CPU: {cpu_name()}; Python {platform.python_version()}; {args.steps} timed steps per row")
    print(header)
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scheduler']} | {r['scenario']} | {r['running']} | {r['cpu_ms_per_step']:.3f} | "
              f"{r['wall_ms_median']:.3f} | {r['wall_ms_p90']:.3f} | {r['us_per_request']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu": cpu_name(), "python": platform.python_version(),
                                              "argv": sys.argv, "results": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
