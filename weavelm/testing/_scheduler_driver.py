"""Drive a scheduler on CPU without a model: `schedule()` -> a hand-built `ModelRunnerOutput` ->
`update_from_output()` (as vLLM's tests/v1/core/utils.py).

`FakeRunner` plays the worker. It keeps its own persistent per-request state from the SchedulerOutput deltas only,
so it checks the message contract (new requests sent once in full, cached ones as deltas, resumed ones with a whole
new block table), and it simulates the paged KV cache: every computed position writes a fingerprint of the token
prefix up to it into its slot, and before computing a request it checks that every slot of its already-computed
positions holds its own prefix's fingerprint. A wrong prefix-cache hit, a block freed while in use or a stale block
table therefore fails loudly. Sampled tokens depend only on (request id, position), so a run's outputs must not
depend on batching, chunking, preemption or caching.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest

from weavelm.plugin import (EngineCoreOutput, ModelRunnerOutput, Request, RequestStatus, SamplingParams,
                            SchedulerOutput)

EOS = 2
VOCAB = 500


def make_request(rid: str, prompt: int | list[int], max_tokens: int = 8, priority: int = 0,
                 arrival_time: float | None = None, stop_token_ids: Iterable[int] = (),
                 ignore_eos: bool = True) -> Request:
    """`prompt` is a token list, or a length for a prompt of tokens unique to `rid`."""
    if isinstance(prompt, int):
        base = sum(map(ord, rid)) * 7
        prompt = [3 + (base + 13 * i) % (VOCAB - 3) for i in range(prompt)]
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, priority=priority,
                        stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos)
    return Request(rid, prompt, sp, eos_token_id=EOS, arrival_time=arrival_time)


def fake_token(rid: str, position: int) -> int:
    """The token the fake model samples at `position` of request `rid`: never EOS, never < 3."""
    return 3 + zlib.crc32(f"{rid}@{position}".encode()) % (VOCAB - 3)


@dataclass
class _RunnerState:
    tokens: list[int]
    block_ids: list[int]
    num_computed: int
    fingerprints: list[int] = field(default_factory=list)  # fingerprints[p]: hash of tokens[:p + 1]

    def fingerprint(self, p: int) -> int:
        while len(self.fingerprints) <= p:
            prev = self.fingerprints[-1] if self.fingerprints else 0
            self.fingerprints.append(hash((prev, self.tokens[len(self.fingerprints)])))
        return self.fingerprints[p]


class FakeRunner:
    """A model-free worker that checks the SchedulerOutput contract and simulates paged KV. With `sliding_window`
    w, a token at position p reads (and checks) only the KV of positions p - w + 1 .. p."""

    def __init__(self, block_size: int, max_num_batched_tokens: int | None = None,
                 token_fn=fake_token, check_kv: bool = True, max_num_seqs: int | None = None,
                 sliding_window: int | None = None):
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.token_fn = token_fn
        self.check_kv = check_kv
        self.states: dict[str, _RunnerState] = {}
        self.kv: dict[tuple[int, int], int] = {}  # (block id, offset) -> fingerprint written there
        self.seen: set[str] = set()

    def _slot(self, st: _RunnerState, p: int) -> tuple[int, int]:
        return st.block_ids[p // self.block_size], p % self.block_size

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        for rid in scheduler_output.finished_req_ids:
            self.states.pop(rid, None)
        num_scheduled = scheduler_output.num_scheduled_tokens
        assert sum(num_scheduled.values()) == scheduler_output.total_num_scheduled_tokens
        if self.max_num_batched_tokens is not None:
            assert scheduler_output.total_num_scheduled_tokens <= self.max_num_batched_tokens, "token budget exceeded"
        if self.max_num_seqs is not None:
            assert len(num_scheduled) <= self.max_num_seqs, "more requests than max_num_seqs"
        assert all(n > 0 for n in num_scheduled.values())
        assert not (scheduler_output.preempted_req_ids & set(num_scheduled))
        new_ids = [nr.req_id for nr in scheduler_output.scheduled_new_reqs]
        cached = scheduler_output.scheduled_cached_reqs
        listed = new_ids + cached.req_ids
        assert len(listed) == len(set(listed)) and set(listed) == set(num_scheduled), \
            "each scheduled request is listed exactly once, as new or cached"
        for nr in scheduler_output.scheduled_new_reqs:
            assert nr.req_id not in self.seen, f"{nr.req_id} sent as new twice"
            self.seen.add(nr.req_id)
            self.states[nr.req_id] = _RunnerState(list(nr.prompt_token_ids), list(nr.block_ids),
                                                  nr.num_computed_tokens)
        for rid, resumed, blocks, num_computed in zip(cached.req_ids, cached.resumed_from_preemption,
                                                      cached.new_block_ids, cached.num_computed_tokens, strict=True):
            st = self.states.get(rid)
            assert st is not None, f"cached request {rid} unknown to the worker"
            if resumed:
                st.block_ids = list(blocks)
            else:
                assert num_computed == st.num_computed, f"{rid}: computed {num_computed} != {st.num_computed}"
                st.block_ids.extend(blocks)
            st.num_computed = num_computed
        req_ids, sampled = [], []
        for rid, n in num_scheduled.items():
            st = self.states[rid]
            start, end = st.num_computed, st.num_computed + n
            assert end <= len(st.tokens), f"{rid}: scheduled past its known tokens"
            assert len(st.block_ids) * self.block_size >= end, f"{rid}: blocks do not cover the scheduled tokens"
            if self.check_kv:
                first = 0 if self.sliding_window is None else max(0, start - self.sliding_window + 1)
                for p in range(first, start):
                    got = self.kv.get(self._slot(st, p))
                    assert got == st.fingerprint(p), f"{rid}: stale or foreign KV at position {p}"
                for p in range(start, end):
                    self.kv[self._slot(st, p)] = st.fingerprint(p)
            st.num_computed = end
            req_ids.append(rid)
            if end == len(st.tokens):
                tok = self.token_fn(rid, end)
                st.tokens.append(tok)
                sampled.append([tok])
            else:
                sampled.append([])
        return ModelRunnerOutput(req_ids, {r: i for i, r in enumerate(req_ids)}, sampled, None)


@dataclass
class Driver:
    """Runs steps and keeps what a client would see: tokens per request and each finish."""

    scheduler: object
    runner: FakeRunner
    tokens: dict[str, list[int]] = field(default_factory=dict)
    finishes: dict[str, list[str]] = field(default_factory=dict)  # request id -> finish reasons reported
    outputs: list[SchedulerOutput] = field(default_factory=list)
    check: bool = True

    def add(self, req: Request) -> None:
        """Add as EngineCore does: `check_request` first; a request the scheduler refuses skips the test."""
        reason = self.scheduler.check_request(req)
        if reason is not None:
            pytest.skip(f"{type(self.scheduler).name} refuses request {req.request_id}: {reason}")
        self.tokens[req.request_id] = []
        self.scheduler.add_request(req)

    def _collect(self, outs: list[EngineCoreOutput]) -> None:
        for o in outs:
            self.tokens[o.request_id].extend(o.new_token_ids)
            if o.finished:
                self.finishes.setdefault(o.request_id, []).append(o.finish_reason)

    def step(self) -> SchedulerOutput:
        scheduler_output = self.scheduler.schedule()
        self.outputs.append(scheduler_output)
        runner_output = self.runner.execute(scheduler_output)
        self._collect(self.scheduler.update_from_output(scheduler_output, runner_output))
        if self.check:
            check_scheduler(self.scheduler)
        return scheduler_output

    def abort(self, rids: Iterable[str]) -> None:
        self._collect(self.scheduler.finish_requests(list(rids), RequestStatus.FINISHED_ABORTED))
        if self.check:
            check_scheduler(self.scheduler)

    def run(self, max_steps: int = 10_000) -> int:
        steps = 0
        while self.scheduler.has_unfinished_requests():
            self.step()
            steps += 1
            assert steps <= max_steps, "no progress"
        return steps


def check_scheduler(sched) -> None:
    """Invariants checked after every step: the stats every scheduler reports, and the built-in mechanics'
    internals where a scheduler has them (`kv`, `running`, `waiting`, `requests`)."""
    stats = sched.get_stats()
    assert 0.0 <= stats.kv_usage <= 1.0 and 0.0 <= stats.prefix_hit_rate <= 1.0
    assert stats.num_running >= 0 and stats.num_waiting >= 0
    kv = getattr(sched, "kv", None)
    if kv is not None and hasattr(kv, "check_invariants"):
        kv.check_invariants()
    running, waiting = getattr(sched, "running", None), getattr(sched, "waiting", None)
    if running is None or waiting is None:
        return
    assert stats.num_running == len(running) and stats.num_waiting == len(waiting)
    ids = [r.request_id for r in running] + [r.request_id for r in waiting]
    assert len(ids) == len(set(ids)), "a request is queued twice"
    if hasattr(sched, "requests"):
        assert set(ids) == set(sched.requests), "queues and the request table disagree"
    assert all(r.status == RequestStatus.RUNNING for r in running)
    assert all(r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) for r in waiting)
    if kv is not None and hasattr(kv, "req_blocks"):
        holders = {rid for rid, table in kv.req_blocks.items() if table}
        assert holders <= {r.request_id for r in running}, "a waiting or finished request holds blocks"
        for r in running:
            table = kv.req_blocks.get(r.request_id, [])
            assert len(table) * kv.block_size >= r.num_computed_tokens
