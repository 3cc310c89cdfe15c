"""`weavelm bench throughput`: one workload, all requests queued at once; output tok/s, total tok/s, req/s."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass

from weavelm.bench.runner import RunRecord, run_workload, warmup
from weavelm.bench.stats import summarize
from weavelm.bench.workload import (NANO_VLLM_LEN_RANGE, NANO_VLLM_NUM_PROMPTS, Workload, check_fits, load_jsonl,
                                    random_workload)


@dataclass
class WorkloadSpec:
    """How to get a workload: a JSONL path, else nano-vllm's random one with these sizes."""

    path: str | None = None
    num_prompts: int = NANO_VLLM_NUM_PROMPTS
    input_len: tuple[int, int] = NANO_VLLM_LEN_RANGE
    output_len: tuple[int, int] = NANO_VLLM_LEN_RANGE
    seed: int = 0

    def make(self, engine) -> Workload:
        """Build it for this engine (`LLMEngine`): random token ids stay inside its vocabulary and context."""
        if self.path:
            wl = load_jsonl(self.path)
            check_fits(wl, engine.vocab_size, engine.max_model_len)
            return wl
        return random_workload(self.num_prompts, self.input_len, self.output_len, engine.vocab_size,
                               engine.max_model_len, self.seed)


def run_throughput(llm, spec: WorkloadSpec, temperature: float = 0.0, do_warmup: bool = True,
                   progress: bool = False) -> dict:
    engine = llm.engine
    workload = spec.make(engine)
    if do_warmup:
        warmup(engine)
    run = run_workload(engine, workload, temperature=temperature, progress=progress, desc="throughput")
    return throughput_result(run, workload, llm.config)


def throughput_result(run: RunRecord, workload: Workload, config) -> dict:
    lat = run.latencies()
    return {"bench": "throughput", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform_info(config),
            "config": config.to_dict(), "workload": workload.describe(), **run.throughput(),
            "ttft_ms": summarize(lat["ttft_s"], 1e3), "tpot_ms": summarize(lat["tpot_s"], 1e3),
            "e2e_ms": summarize(lat["e2e_s"], 1e3)}


def format_throughput(r: dict) -> str:
    wl = r["workload"]
    lines = [f"workload: {wl['source']}" + (f" ({wl['num_clipped']} clipped to max_model_len)"
                                            if wl["num_clipped"] else ""),
             f"requests: {r['num_requests']} ({r['num_errors']} errors)   prompt tokens: {r['prompt_tokens']}   "
             f"output tokens: {r['output_tokens']}",
             f"wall time:     {r['wall_s']:.2f} s",
             f"output tok/s:  {r['output_tok_s']:.1f}",
             f"total tok/s:   {r['total_tok_s']:.1f}",
             f"requests/s:    {r['req_s']:.2f}"]
    return "\n".join(lines)


def platform_info(config=None) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "cpu_count": _cpu_count()}
    device = getattr(config, "device", None)
    if torch.cuda.is_available() and device != "cpu":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_count() -> int:
    import os
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
