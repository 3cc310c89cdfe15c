"""`weavelm bench latency`: TTFT, TPOT and end-to-end latency for fixed batch sizes and lengths."""

from __future__ import annotations

import itertools
import time

from weavelm.bench.runner import run_workload, warmup
from weavelm.bench.stats import summarize
from weavelm.bench.throughput import platform_info
from weavelm.bench.workload import random_workload
from weavelm.errors import RequestError


def run_latency(llm, batch_sizes: list[int], input_lens: list[int], output_lens: list[int], iters: int = 3,
                warmup_iters: int = 1, seed: int = 0, progress: bool = False) -> dict:
    """For every (batch, input, output) case: `iters` timed batches of identical-length random prompts, all
    queued at once. Percentiles are over every request of every timed batch (ITL over every token gap)."""
    engine = llm.engine
    cases = []
    combos = list(itertools.product(batch_sizes, input_lens, output_lens))
    bar = _bar(len(combos) * (iters + warmup_iters), progress)
    warmup(engine)
    for batch, inp, out in combos:
        if inp + out > engine.max_model_len:
            raise RequestError(f"latency case input {inp} + output {out} exceeds max_model_len "
                               f"{engine.max_model_len}; choose shorter lengths")
        lat: dict[str, list[float]] = {"ttft_s": [], "tpot_s": [], "e2e_s": [], "itl_s": []}
        walls, out_tok_s = [], []
        for it in range(warmup_iters + iters):
            wl = random_workload(batch, (inp, inp), (out, out), engine.vocab_size, engine.max_model_len,
                                 seed=seed + it)
            run = run_workload(engine, wl, progress=False)
            if bar is not None:
                bar.update(1)
            if it < warmup_iters:
                continue
            tp = run.throughput()
            if tp["num_errors"]:
                raise RequestError(f"latency case batch {batch}: {tp['num_errors']} requests failed: "
                                   f"{next(r.error for r in run.records if r.error)}")
            walls.append(tp["wall_s"])
            out_tok_s.append(tp["output_tok_s"])
            for k, v in run.latencies().items():
                lat[k].extend(v)
        cases.append({"batch_size": batch, "input_len": inp, "output_len": out, "iters": iters,
                      "ttft_ms": summarize(lat["ttft_s"], 1e3), "tpot_ms": summarize(lat["tpot_s"], 1e3),
                      "e2e_ms": summarize(lat["e2e_s"], 1e3), "itl_ms": summarize(lat["itl_s"], 1e3),
                      "batch_wall_s": summarize(walls), "output_tok_s": summarize(out_tok_s)})
    if bar is not None:
        bar.close()
    return {"bench": "latency", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform_info(llm.config),
            "config": llm.config.to_dict(), "seed": seed, "cases": cases}


def format_latency(r: dict) -> str:
    head = ("batch", "in", "out", "TTFT ms p50/p90/p99", "TPOT ms p50/p90/p99", "e2e ms p50/p90/p99", "out tok/s")
    rows = [head]
    for c in r["cases"]:
        rows.append((str(c["batch_size"]), str(c["input_len"]), str(c["output_len"]), _pcts(c["ttft_ms"]),
                     _pcts(c["tpot_ms"]), _pcts(c["e2e_ms"]), f"{c['output_tok_s']['median']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def _pcts(s: dict) -> str:
    if not s["n"]:
        return "-"
    return f"{s['median']:.1f} / {s['p90']:.1f} / {s['p99']:.1f}"


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc="latency", unit="batch", dynamic_ncols=True)
