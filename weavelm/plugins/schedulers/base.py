"""Scheduling mechanics shared by the built-in policies: queues, token budget, chunked prefill, block accounting
through `core.kv_cache`, preemption by recompute. A policy subclass decides only the order of the waiting queue
and which running request to preempt."""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field

from weavelm.core.interfaces import Scheduler, SchedulerContext
from weavelm.core.kv_cache import KVCacheManager
from weavelm.core.outputs import (CachedRequestsData, EngineCoreOutput, ModelRunnerOutput, NewRequestData,
                                  SchedulerOutput, SchedulerStats)
from weavelm.core.request import Request, RequestStatus


class SchedulerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_num_seqs: int = Field(256, ge=1, description="Most requests running at once.")
    max_num_batched_tokens: int = Field(8192, ge=1, description="Token budget of one step.")
    enable_chunked_prefill: bool = Field(True, description="Split prompts across steps to fit the budget.")
    long_prefill_token_threshold: int = Field(0, ge=0, description="Cap on one request's prefill chunk; 0: none.")


class BaseScheduler(Scheduler):
    """vLLM v1-style scheduling: running requests first (decodes and unfinished prefill chunks), then waiting
    requests while the budget, `max_num_seqs` and free blocks allow."""

    Options = SchedulerOptions

    def __init__(self, options: SchedulerOptions, context: SchedulerContext):
        super().__init__(options, context)
        self.kv = KVCacheManager(context.num_blocks, context.block_size, context.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.finished_req_ids: set[str] = set()
        self.step_count = 0
        self._preempted_this_step = 0
        self._last_scheduled_tokens = 0

    # -- policy hooks -------------------------------------------------------------------------------------
    def next_waiting_index(self) -> int:
        """Index in `self.waiting` of the request to admit next."""
        return 0

    def select_victim(self, candidates: list[Request], for_request: Request) -> Request | None:
        """The running request to preempt so `for_request` can get blocks, or None to give up."""
        return candidates[-1] if candidates else None

    def may_preempt_for_waiting(self, waiting: Request, victim: Request) -> bool:
        """Whether a waiting request may preempt a running one to be admitted (off for FCFS)."""
        return False

    def requeue_preempted(self, request: Request) -> None:
        self.waiting.insert(0, request)

    # -- Scheduler interface ------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def _chunk(self, request: Request, budget: int, num_computed: int) -> int:
        n = request.num_tokens - num_computed
        if self.options.long_prefill_token_threshold:
            n = min(n, self.options.long_prefill_token_threshold)
        return min(n, budget, self.context.max_model_len - num_computed)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self._preempted_this_step += 1
        self.requeue_preempted(request)

    def schedule(self) -> SchedulerOutput:
        budget = self.options.max_num_batched_tokens
        num_sched: dict[str, int] = {}
        new_blocks: dict[str, list[int]] = {}
        scheduled_running: list[Request] = []
        preempted: set[str] = set()
        self._preempted_this_step = 0

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._chunk(req, budget, req.num_computed_tokens)
            if n <= 0:
                i += 1
                continue
            while True:
                blocks = self.kv.allocate_slots(req, n)
                if blocks is not None:
                    break
                victim = self.select_victim(list(self.running), req)
                if victim is None:
                    break
                if victim in scheduled_running:
                    scheduled_running.remove(victim)
                    budget += num_sched.pop(victim.request_id)
                    new_blocks.pop(victim.request_id, None)
                if self.running.index(victim) < i:
                    i -= 1
                self._preempt(victim)
                preempted.add(victim.request_id)
                if victim is req:
                    break
            if blocks is None:
                if req in self.running:  # no victim could free enough: try again next step
                    i += 1
                continue
            scheduled_running.append(req)
            num_sched[req.request_id] = n
            new_blocks[req.request_id] = blocks
            budget -= n
            i += 1

        scheduled_new: list[Request] = []
        scheduled_resumed: list[Request] = []
        running_preempted = bool(preempted)
        while self.waiting and budget > 0 and not running_preempted:
            idx = self.next_waiting_index()
            req = self.waiting[idx]
            if len(self.running) >= self.options.max_num_seqs:
                victim = self._victim_for_waiting(req, scheduled_running)
                if victim is None:
                    break
                self._evict_for_waiting(victim, scheduled_running, num_sched, new_blocks, preempted)
                budget = self.options.max_num_batched_tokens - sum(num_sched.values())
                continue
            computed = self.kv.get_computed_blocks(req)
            n = self._chunk(req, budget, computed.num_tokens)
            if not self.options.enable_chunked_prefill and n < req.num_tokens - computed.num_tokens:
                break
            blocks = self.kv.allocate_slots(req, n, computed) if n > 0 else None
            if blocks is None:
                victim = self._victim_for_waiting(req, scheduled_running)
                if victim is None:
                    break
                self._evict_for_waiting(victim, scheduled_running, num_sched, new_blocks, preempted)
                budget = self.options.max_num_batched_tokens - sum(num_sched.values())
                continue
            self.waiting.pop(idx)
            (scheduled_resumed if req.status == RequestStatus.PREEMPTED else scheduled_new).append(req)
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = computed.num_tokens
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = computed.num_tokens
            self.running.append(req)
            num_sched[req.request_id] = n
            new_blocks[req.request_id] = blocks
            budget -= n

        return self._make_output(scheduled_new, scheduled_resumed, scheduled_running, num_sched, new_blocks,
                                 preempted)

    def _victim_for_waiting(self, waiting: Request, scheduled_running: list[Request]) -> Request | None:
        victim = self.select_victim(list(self.running), waiting)
        if victim is None or not self.may_preempt_for_waiting(waiting, victim):
            return None
        return victim

    def _evict_for_waiting(self, victim: Request, scheduled_running: list[Request], num_sched: dict[str, int],
                           new_blocks: dict[str, list[int]], preempted: set[str]) -> None:
        if victim in scheduled_running:
            scheduled_running.remove(victim)
            num_sched.pop(victim.request_id)
            new_blocks.pop(victim.request_id, None)
        elif victim.request_id in num_sched:  # admitted from waiting earlier in this step
            num_sched.pop(victim.request_id)
            new_blocks.pop(victim.request_id, None)
        self._preempt(victim)
        preempted.add(victim.request_id)

    def _make_output(self, new: list[Request], resumed: list[Request], running: list[Request],
                     num_sched: dict[str, int], new_blocks: dict[str, list[int]],
                     preempted: set[str]) -> SchedulerOutput:
        new = [r for r in new if r.request_id in num_sched]
        resumed = [r for r in resumed if r.request_id in num_sched]
        new_data = [NewRequestData(r.request_id, r.prompt_token_ids, r.sampling_params,
                                   self.kv.block_ids(r.request_id), r.num_computed_tokens) for r in new]
        cached = CachedRequestsData()
        for r, is_resumed in [(r, False) for r in running] + [(r, True) for r in resumed]:
            cached.req_ids.append(r.request_id)
            cached.resumed_from_preemption.append(is_resumed)
            cached.new_block_ids.append(self.kv.block_ids(r.request_id) if is_resumed else new_blocks[r.request_id])
            cached.num_computed_tokens.append(r.num_computed_tokens)
        total = sum(num_sched.values())
        out = SchedulerOutput(
            scheduled_new_reqs=new_data,
            scheduled_cached_reqs=cached,
            num_scheduled_tokens=num_sched,
            total_num_scheduled_tokens=total,
            finished_req_ids=self.finished_req_ids,
            preempted_req_ids=preempted - set(num_sched),
        )
        self.finished_req_ids = set()
        for rid, n in num_sched.items():
            self.requests[rid].num_computed_tokens += n
        self._last_scheduled_tokens = total
        self.step_count += 1
        return out

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        index = runner_output.req_id_to_index
        for rid in scheduler_output.num_scheduled_tokens:
            req = self.requests.get(rid)
            if req is None or req.is_finished() or rid not in index:
                continue
            i = index[rid]
            sampled = runner_output.sampled_token_ids[i]
            if not sampled:
                continue
            lps = runner_output.logprobs[i] if runner_output.logprobs else None
            new_tokens: list[int] = []
            for tok in sampled:
                req.append_output_token(tok)
                new_tokens.append(tok)
                if self._check_stop(req, tok):
                    break
            if lps is not None:
                req.logprobs.extend(lps[: len(new_tokens)])
            out = EngineCoreOutput(rid, new_tokens, lps[: len(new_tokens)] if lps is not None else None,
                                   num_cached_tokens=max(req.num_cached_tokens, 0))
            if req.is_finished():
                out.finish_reason = req.status.finish_reason
                out.stop_reason = req.stop_reason
                self._free_finished(req)
            outputs.append(out)
        return outputs

    def _check_stop(self, req: Request, token: int) -> bool:
        sp = req.sampling_params
        if not sp.ignore_eos and req.eos_token_id is not None and token == req.eos_token_id:
            req.status = RequestStatus.FINISHED_STOPPED
        elif token in sp.stop_token_ids:
            req.status = RequestStatus.FINISHED_STOPPED
            req.stop_reason = token
        elif req.num_output_tokens >= sp.max_tokens or req.num_tokens >= self.context.max_model_len:
            req.status = RequestStatus.FINISHED_LENGTH
        return req.is_finished()

    def _free_finished(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
        self.finished_req_ids.add(req.request_id)
        del self.requests[req.request_id]

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[EngineCoreOutput]:
        outs = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished():
                continue
            req.status = status
            self._free_finished(req)
            outs.append(EngineCoreOutput(rid, [], finish_reason=status.finish_reason,
                                         num_cached_tokens=max(req.num_cached_tokens, 0)))
        return outs

    def get_stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running), num_waiting=len(self.waiting), num_preempted=self._preempted_this_step,
            kv_usage=self.kv.usage, prefix_hit_rate=self.kv.prefix_hit_rate,
            num_cached_blocks=self.kv.pool.num_cached_blocks(), num_scheduled_tokens=self._last_scheduled_tokens,
            step=self.step_count)
