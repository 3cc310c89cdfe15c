"""`weavelm ab`: two compositions on one workload, interleaved A B A B in fresh engines; speed and agreement."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

from weavelm.bench.runner import RunRecord, run_workload, warmup
from weavelm.bench.stats import percentile, spread
from weavelm.bench.throughput import WorkloadSpec, platform_info
from weavelm.bench.workload import Workload, check_fits


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    higher_is_better: bool


FIGURES = (
    Figure("output_tok_s", "output tok/s", True),
    Figure("total_tok_s", "total tok/s", True),
    Figure("req_s", "requests/s", True),
    Figure("wall_s", "wall time (s)", False),
    Figure("ttft_median_ms", "median TTFT (ms)", False),
    Figure("tpot_median_ms", "median TPOT (ms)", False),
    Figure("e2e_median_ms", "median e2e (ms)", False),
    Figure("startup_s", "engine startup (s)", False),
)


def run_figures(run: RunRecord, startup_s: float) -> dict:
    tp = run.throughput()
    lat = run.latencies()
    med = {k: percentile(v, 50) * 1e3 if v else None for k, v in lat.items()}
    return {"output_tok_s": tp["output_tok_s"], "total_tok_s": tp["total_tok_s"], "req_s": tp["req_s"],
            "wall_s": tp["wall_s"], "ttft_median_ms": med["ttft_s"], "tpot_median_ms": med["tpot_s"],
            "e2e_median_ms": med["e2e_s"], "startup_s": startup_s, "num_errors": tp["num_errors"],
            "output_tokens": tp["output_tokens"], "prompt_tokens": tp["prompt_tokens"]}


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Share of requests whose token sequences are identical and, per request, the first position where they
    differ (None when identical; the shorter length when one is a prefix of the other)."""
    positions: list[int | None] = []
    for x, y in zip(a, b):
        if x == y:
            positions.append(None)
            continue
        n = min(len(x), len(y))
        positions.append(next((i for i in range(n) if x[i] != y[i]), n))
    diverged = [p for p in positions if p is not None]
    n = len(positions)
    return {"num_requests": n, "num_identical": n - len(diverged),
            "identical_share": (n - len(diverged)) / n if n else 1.0,
            "first_divergence_min": min(diverged) if diverged else None,
            "first_divergence_median": percentile(diverged, 50) if diverged else None,
            "first_divergence": positions}


def run_ab(configs: dict, spec: WorkloadSpec, repeats: int = 3, temperature: float = 0.0,
           progress: bool = False, log=None) -> dict:
    """`configs` maps the two labels (A first) to EngineConfigs. Each run builds a fresh `LLM`, warms it up,
    runs the whole workload and shuts the engine down; the workload is drawn once, from the first engine."""
    from weavelm import LLM

    labels = list(configs)
    assert len(labels) == 2
    workload: Workload | None = None
    runs: list[dict] = []
    tokens: dict[str, list[list[list[int]]]] = {lab: [] for lab in labels}
    bar = _bar(2 * repeats, progress)
    for rep in range(repeats):
        for lab in labels:
            t0 = time.perf_counter()
            llm = LLM(config=configs[lab])
            startup = time.perf_counter() - t0
            try:
                engine = llm.engine
                if workload is None:
                    workload = spec.make(engine)
                else:
                    check_fits(workload, engine.vocab_size, engine.max_model_len)
                warmup(engine)
                run = run_workload(engine, workload, temperature=temperature, seed=spec.seed,
                                   progress=progress, desc=f"{lab} #{rep + 1}")
            finally:
                llm.shutdown()
                del llm
                _release_memory()
            figs = run_figures(run, startup)
            runs.append({"label": lab, "repeat": rep, **figs})
            tokens[lab].append([r.token_ids for r in run.records])
            if log is not None:
                log(f"{lab} #{rep + 1}: {figs['output_tok_s']:.1f} out tok/s, wall {figs['wall_s']:.2f} s")
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    assert workload is not None
    return ab_result(configs, labels, workload, runs, tokens, temperature)


def ab_result(configs, labels, workload, runs, tokens, temperature) -> dict:
    a, b = labels
    figures = {}
    for f in FIGURES:
        va = [r[f.key] for r in runs if r["label"] == a and r[f.key] is not None]
        vb = [r[f.key] for r in runs if r["label"] == b and r[f.key] is not None]
        if not va or not vb:
            continue
        sa, sb = spread(va), spread(vb)
        ratio = sb["median"] / sa["median"] if sa["median"] else None
        # a side is "better" only when the two sides' ranges do not overlap; otherwise the runs cannot tell
        separated = sa["max"] < sb["min"] or sb["max"] < sa["min"]
        better = None if ratio is None or not separated else (b if (ratio > 1) == f.higher_is_better else a)
        figures[f.key] = {"label": f.label, "higher_is_better": f.higher_is_better, a: sa, b: sb,
                          "ratio_b_over_a": ratio, "better": better}
    return {
        "bench": "ab", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "labels": labels,
        "host": platform_info(configs[a]),
        "configs": {lab: configs[lab].to_dict() for lab in labels},
        "workload": workload.describe(), "repeats": len(tokens[a]), "order": [f"{r['label']}#{r['repeat'] + 1}"
                                                                             for r in runs],
        "temperature": temperature, "greedy": temperature == 0.0,
        "figures": figures, "runs": runs,
        "agreement": agreement(tokens[a][0], tokens[b][0]),
        "repeat_agreement": {lab: min(agreement(tokens[lab][0], t)["identical_share"] for t in tokens[lab])
                             for lab in labels},
    }


def _release_memory() -> None:
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc="ab runs", unit="run", dynamic_ncols=True)
