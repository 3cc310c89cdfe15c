"""Drive an engine through a workload step by step, stamping every output token (the data all benches share)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from weavelm.bench.workload import Workload
from weavelm.core.request import SamplingParams
from weavelm.errors import RequestError


@dataclass
class RequestRecord:
    """One request's result. Times are `time.perf_counter()` stamps; `token_times[i]` is when token i arrived."""

    prompt_len: int
    token_ids: list[int] = field(default_factory=list)
    arrival: float = 0.0
    token_times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def e2e(self) -> float | None:
        return self.token_times[-1] - self.arrival if self.token_times else None

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None

    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


@dataclass
class RunRecord:
    records: list[RequestRecord]
    wall_s: float
    num_steps: int

    def throughput(self) -> dict:
        ok = [r for r in self.records if r.error is None]
        prompt = sum(r.prompt_len for r in ok)
        output = sum(len(r.token_ids) for r in ok)
        wall = max(self.wall_s, 1e-9)
        return {"num_requests": len(self.records), "num_errors": len(self.records) - len(ok),
                "prompt_tokens": prompt, "output_tokens": output, "wall_s": self.wall_s,
                "num_steps": self.num_steps, "output_tok_s": output / wall, "total_tok_s": (prompt + output) / wall,
                "req_s": len(ok) / wall}

    def latencies(self) -> dict[str, list[float]]:
        """Per-request TTFT, TPOT and end-to-end seconds, and every inter-token gap."""
        ok = [r for r in self.records if r.error is None]
        return {"ttft_s": [r.ttft for r in ok if r.ttft is not None],
                "tpot_s": [r.tpot for r in ok if r.tpot is not None],
                "e2e_s": [r.e2e for r in ok if r.e2e is not None],
                "itl_s": [x for r in ok for x in r.itls()]}


def sampling_params(max_tokens: int, temperature: float = 0.0, priority: int = 0,
                    seed: int | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=True, priority=priority,
                          seed=seed)


def run_workload(engine, workload: Workload, temperature: float = 0.0, seed: int | None = None,
                 progress: bool = False, desc: str = "bench", loras: list | None = None) -> RunRecord:
    """Queue every request at once, step until all finish. `engine` is an LLMEngine (`llm.engine`). With
    `loras`, request i runs on LoRA adapter `loras[i % len(loras)]` (None: the base model)."""
    records: dict[str, RequestRecord] = {}
    bar = _bar(sum(i.max_tokens for i in workload.items), desc, progress)
    steps = 0
    start = time.perf_counter()
    for i, item in enumerate(workload.items):
        rid = f"bench-{i}"
        params = sampling_params(item.max_tokens, temperature, item.priority,
                                 None if seed is None else seed + i)
        rec = RequestRecord(prompt_len=len(item.prompt_token_ids or []), arrival=time.perf_counter())
        records[rid] = rec
        try:
            engine.add_request(item.engine_prompt(), params, request_id=rid,
                               lora_request=loras[i % len(loras)] if loras else None)
        except RequestError as e:
            rec.error = str(e)
    while engine.has_unfinished_requests():
        outs = engine.step(delta=True)
        steps += 1
        now = time.perf_counter()
        added_total = 0
        for out in outs:
            rec = records.get(out.request_id)
            if rec is None:
                continue
            new = out.outputs[0].token_ids
            if new:
                rec.token_times.extend([now] * len(new))
                rec.token_ids.extend(new)
                added_total += len(new)
            if out.finished:
                rec.prompt_len = len(out.prompt_token_ids)
            if out.finished and out.error:
                rec.error = out.error
        if bar is not None and added_total:
            bar.update(added_total)
    wall = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return RunRecord(list(records.values()), wall, steps)


def warmup(engine, num_tokens: int = 8) -> None:
    """One short request, so lazy initialisation (kernels, allocator, compilation) stays out of the timing."""
    prompt = [i % engine.vocab_size for i in range(1, 17)][: max(1, engine.max_model_len - num_tokens)]
    params = sampling_params(max(1, min(num_tokens, engine.max_model_len - len(prompt))))
    engine.add_request({"prompt_token_ids": prompt}, params, request_id="bench-warmup")
    while engine.has_unfinished_requests():
        engine.step()


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="tok", leave=False, dynamic_ncols=True)
