"""The public scheduling-policy base (`weavelm.plugin.BaseScheduler`, versioned with `API_VERSION`).

`BaseScheduler` implements every duty of the `Scheduler` interface (queues, token budget, chunked prefill, block
accounting through `KVCacheManager`, preemption by recompute, prefix caching, stop checks). A policy subclass
decides only four things, through the hooks below: the order of the waiting queue (`next_waiting_index`), which
running request to preempt (`select_victim`), whether a waiting request may preempt a running one
(`may_preempt_for_waiting`), and where a preempted request is requeued (`requeue_preempted`). The built-in `fcfs`
and `priority` plugins are such subclasses; so is the out-of-tree `shortest_prompt` example.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from weavelm.core.contexts import SchedulerContext, SchedulerLimits
from weavelm.core.encoder_cache import EncoderCacheManager, check_encoder_limits, plan_encoder_inputs
from weavelm.core.interfaces import Scheduler
from weavelm.core.kv_cache import KVCacheManager
from weavelm.core.outputs import (CachedRequestsData, EngineCoreOutput, ModelRunnerOutput, NewRequestData,
                                  SchedulerOutput, SchedulerStats)
from weavelm.core.request import Request, RequestStatus
from weavelm.spec_decode.scheduling import SpecDecodeScheduling, kept_blocks

_RUNNING = RequestStatus.RUNNING
_PREEMPTED = RequestStatus.PREEMPTED


class SchedulerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_num_seqs: int = Field(256, ge=1, le=8192, description="Most requests running at once (the runner keeps a "
                              "row of max_model_len token ids for each, so the bound keeps that allocatable).")
    max_num_batched_tokens: int = Field(8192, ge=1, le=1 << 20, description="Token budget of one step.")
    enable_chunked_prefill: bool = Field(True, description="Split prompts across steps to fit the budget.")
    long_prefill_token_threshold: int = Field(
        0, ge=0, le=1 << 20, description="Cap on one request's prefill chunk per step (with chunked prefill); 0: none.")
    max_num_encoder_input_tokens: int = Field(
        8192, ge=1, le=1 << 22, description="Multimodal encoder budget of one step, in encoder output tokens "
        "(placeholder tokens); an item larger than it is refused (vLLM's name).")
    encoder_cache_size: int = Field(
        8192, ge=1, le=1 << 22, description="Encoder outputs the runner keeps between the chunks of a placeholder "
        "run, in tokens (vLLM's name).")


@dataclass
class _StepPlan:
    """What one `schedule()` call has decided so far."""

    budget: int
    num_sched: dict[str, int] = field(default_factory=dict)
    new_blocks: dict[str, list[int]] = field(default_factory=dict)
    running: dict[str, Request] = field(default_factory=dict)  # scheduled from the running queue, in order
    new: list[Request] = field(default_factory=list)
    resumed: list[Request] = field(default_factory=list)
    admitted: set[str] = field(default_factory=set)  # moved from waiting to running this step
    preempted: set[str] = field(default_factory=set)
    spec_tokens: dict[str, list[int]] = field(default_factory=dict)  # drafts scheduled for verification
    encoder_budget: int = 0  # encoder tokens left this step (multimodal)
    encoder_inputs: dict[str, list[int]] = field(default_factory=dict)  # req_id -> mm items encoded this step


class BaseScheduler(Scheduler):
    """vLLM v1-style scheduling: running requests first (decodes and unfinished prefill chunks), then waiting
    requests while the budget, `max_num_seqs` and free blocks allow. No waiting request is admitted in a step that
    had to preempt a running one for blocks."""

    Options = SchedulerOptions
    supports_async_scheduling = True

    @classmethod
    def limits(cls, options: SchedulerOptions) -> SchedulerLimits:
        return SchedulerLimits(options.max_num_seqs, options.max_num_batched_tokens)

    def __init__(self, options: SchedulerOptions, context: SchedulerContext):
        super().__init__(options, context)
        self.kv = KVCacheManager(context.num_blocks, context.block_size, context.enable_prefix_caching,
                                 context.sliding_window)
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.finished_req_ids: set[str] = set()
        self.step_count = 0
        self.num_preemptions = 0  # since start
        self._step_preemptions = 0
        self._step_tokens = 0
        self.spec = (SpecDecodeScheduling(context.num_speculative_tokens, context.num_lookahead_tokens,
                                          context.max_model_len) if context.num_speculative_tokens else None)
        # Async scheduling: schedule() for step N+1 runs before update_from_output() of step N. A request whose
        # step-N token is still on the device holds a placeholder for it (`num_output_placeholders`): it is
        # scheduled for its next decode on that unknown token (the runner feeds it from the device), unless that
        # token is its last (max_tokens / max_model_len); a stop token ends it one step late, and the extra
        # step's output is dropped.
        self.async_scheduling = context.async_scheduling and self.spec is None
        self.encoder_cache = EncoderCacheManager(options.encoder_cache_size)

    # -- policy hooks -------------------------------------------------------------------------------------
    def next_waiting_index(self) -> int:
        """Index in `self.waiting` (non-empty) of the request to admit next."""
        return 0

    def select_victim(self, candidates: list[Request], for_request: Request) -> Request | None:
        """The request of `candidates` (running, in admission order) to preempt so `for_request` can get blocks
        or a seat, or None to give up. `for_request` itself may be among the candidates and chosen."""
        return candidates[-1] if candidates else None

    def may_preempt_for_waiting(self, waiting: Request, victim: Request) -> bool:
        """Whether the waiting request may preempt the running `victim` to be admitted (off for FCFS)."""
        return False

    def requeue_preempted(self, request: Request) -> None:
        """Put a preempted request back in `self.waiting`."""
        self.waiting.insert(0, request)

    # -- Scheduler interface ------------------------------------------------------------------------------
    def check_request(self, request: Request) -> str | None:
        opts, ctx = self.options, self.context
        if not opts.enable_chunked_prefill and request.num_prompt_tokens > opts.max_num_batched_tokens:
            return (f"prompt: has {request.num_prompt_tokens} tokens but chunked prefill is off and the step budget "
                    f"is scheduler.max_num_batched_tokens={opts.max_num_batched_tokens}; shorten the prompt, raise "
                    f"the budget or set scheduler.enable_chunked_prefill: true")
        if request.mm_features:
            reason = check_encoder_limits(request, opts.max_num_encoder_input_tokens, opts.encoder_cache_size,
                                          opts.enable_chunked_prefill)
            if reason is not None:
                return reason
        longest = min(request.num_prompt_tokens + request.sampling_params.max_tokens, ctx.max_model_len)
        needed = self.kv.blocks_for_tokens(longest)
        if needed > ctx.num_blocks:
            return (f"prompt: {request.num_prompt_tokens} tokens + max_tokens "
                    f"{request.sampling_params.max_tokens} need {needed} KV blocks but the pool holds "
                    f"{ctx.num_blocks}; lower max_tokens or give the KV cache more memory")
        return None

    def add_request(self, request: Request) -> None:
        assert request.request_id not in self.requests, f"duplicate request id {request.request_id!r}"
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        plan = _StepPlan(self.options.max_num_batched_tokens,
                         encoder_budget=self.options.max_num_encoder_input_tokens)
        self._step_preemptions = 0
        self._schedule_running(plan)
        if not plan.preempted:
            self._schedule_waiting(plan)
        return self._make_output(plan)

    def _chunk(self, request: Request, budget: int, num_computed: int) -> int:
        n = request.num_tokens - num_computed
        threshold = self.options.long_prefill_token_threshold
        if threshold and self.options.enable_chunked_prefill:
            n = min(n, threshold)
        return min(n, budget, self.context.max_model_len - num_computed)

    def _schedule_running(self, plan: _StepPlan) -> None:
        i = 0
        max_len = self.context.max_model_len
        spec = self.spec
        while i < len(self.running) and plan.budget > 0:
            req = self.running[i]
            computed = req.num_computed_tokens
            drafts = None
            pending = req.num_output_placeholders
            if pending and self._last_token_in_flight(req, pending):
                i += 1
                continue
            if len(req.all_token_ids) + pending - computed == 1 and computed < max_len:
                n = 1  # a decode: the common case, spared the general computation
                if spec is not None:
                    drafts = spec.drafts_for(req, plan.budget)
                    n += len(drafts)
            else:
                n = self._chunk(req, plan.budget, computed)
            encoder = None
            if req.mm_features and n > 0:
                encoder = plan_encoder_inputs(req, computed, n, plan.encoder_budget, self.encoder_cache)
                n = encoder.num_tokens
            if n <= 0:
                i += 1
                continue
            reserve = n + spec.lookahead_for(req, computed, n) if spec is not None else n
            blocks = self.kv.allocate_slots(req, reserve)
            while blocks is None:
                victim = self.select_victim(list(self.running), req)
                if victim is None:
                    break
                victim_index = self.running.index(victim)
                self._preempt(victim, plan)
                if victim is req:
                    break
                if victim_index < i:
                    i -= 1
                blocks = self.kv.allocate_slots(req, reserve)
            if blocks is None:
                if req.status == RequestStatus.RUNNING:  # the policy gave up: leave it for a later step
                    i += 1
                continue
            plan.running[req.request_id] = req
            plan.num_sched[req.request_id] = n
            plan.new_blocks[req.request_id] = blocks
            if drafts:
                plan.spec_tokens[req.request_id] = drafts
            if encoder is not None and encoder.items:
                self._commit_encoder(req, encoder.items, plan)
            plan.budget -= n
            i += 1

    def _last_token_in_flight(self, req: Request, pending: int) -> bool:
        """Whether the request's in-flight tokens already reach max_tokens or max_model_len (async scheduling)."""
        return (len(req.output_token_ids) + pending >= req.sampling_params.max_tokens
                or len(req.all_token_ids) + pending >= self.context.max_model_len)

    def _schedule_waiting(self, plan: _StepPlan) -> None:
        held: list[Request] = []  # waiting on a LoRA slot: set aside this step, back in front after it
        try:
            self._admit_waiting(plan, held)
        finally:
            self.waiting[:0] = held

    def _admit_waiting(self, plan: _StepPlan, held: list[Request]) -> None:
        opts, lora = self.options, self.context.lora
        refused: set[int] = set()  # adapters refused this step: asked once each, not once per waiting request
        while self.waiting and plan.budget > 0:
            idx = self.next_waiting_index()
            req = self.waiting[idx]
            if req.request_id in plan.preempted:  # never resume in the step that preempted it
                break
            if lora is not None and req.lora_request is not None:
                adapter = req.lora_request.lora_int_id
                if adapter in refused or not lora.can_admit(req, self.running):
                    refused.add(adapter)
                    held.append(self.waiting.pop(idx))
                    continue
            if len(self.running) >= opts.max_num_seqs:
                if self._preempt_for_waiting(req, plan):
                    continue
                break
            computed = self.kv.get_computed_blocks(req)
            n = self._chunk(req, plan.budget, computed.num_tokens)
            encoder = None
            if req.mm_features:
                encoder = plan_encoder_inputs(req, computed.num_tokens, n, plan.encoder_budget, self.encoder_cache)
                n = encoder.num_tokens
                if n <= 0:
                    break
            if not opts.enable_chunked_prefill and n < req.num_tokens - computed.num_tokens:
                break
            reserve = n + self.spec.lookahead_for(req, computed.num_tokens, n) if self.spec is not None else n
            blocks = self.kv.allocate_slots(req, reserve, computed)
            if blocks is None:
                if self._preempt_for_waiting(req, plan):
                    continue
                break
            del self.waiting[idx]
            (plan.resumed if req.status == RequestStatus.PREEMPTED else plan.new).append(req)
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = computed.num_tokens
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = computed.num_tokens
            self.running.append(req)
            plan.admitted.add(req.request_id)
            plan.num_sched[req.request_id] = n
            plan.new_blocks[req.request_id] = blocks
            if encoder is not None and encoder.items:
                self._commit_encoder(req, encoder.items, plan)
            plan.budget -= n

    def _commit_encoder(self, request: Request, items: list[int], plan: _StepPlan) -> None:
        """Run these items' encoders this step: their outputs take cache space until their runs are computed."""
        for index in items:
            length = request.mm_features[index].num_embeds
            self.encoder_cache.allocate(request.request_id, index, length)
            plan.encoder_budget -= length
        plan.encoder_inputs[request.request_id] = items

    def _preempt_for_waiting(self, waiting: Request, plan: _StepPlan) -> bool:
        # requests admitted this step are not candidates: the worker has not seen the new ones yet
        candidates = [r for r in self.running if r.request_id not in plan.admitted]
        victim = self.select_victim(candidates, waiting)
        if victim is None or victim is waiting or not self.may_preempt_for_waiting(waiting, victim):
            return False
        self._preempt(victim, plan)
        return True

    def _preempt(self, request: Request, plan: _StepPlan) -> None:
        """Preempt by recompute: drop the request's blocks and progress (and any scheduling of it this step)."""
        rid = request.request_id
        assert rid not in plan.admitted, "a request admitted this step cannot be preempted in it"
        self.running.remove(request)
        if rid in plan.num_sched:
            plan.budget += plan.num_sched.pop(rid)
            del plan.new_blocks[rid]
            del plan.running[rid]
            plan.spec_tokens.pop(rid, None)
        if request.mm_features:
            for index in plan.encoder_inputs.pop(rid, ()):
                plan.encoder_budget += request.mm_features[index].num_embeds
            self.encoder_cache.free(rid)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        plan.preempted.add(rid)
        self._step_preemptions += 1
        self.num_preemptions += 1
        self.requeue_preempted(request)

    def _make_output(self, plan: _StepPlan) -> SchedulerOutput:
        new_data = [NewRequestData(r.request_id, r.prompt_token_ids, r.sampling_params,
                                   plan.new_blocks[r.request_id], r.num_computed_tokens, r.lora_request,
                                   r.mm_features)
                    for r in plan.new]
        new_blocks = plan.new_blocks
        ids = list(plan.running)
        cached = CachedRequestsData(ids, [False] * len(ids), [new_blocks[rid] for rid in ids],
                                    [r.num_computed_tokens for r in plan.running.values()])
        for r in plan.resumed:
            cached.req_ids.append(r.request_id)
            cached.resumed_from_preemption.append(True)
            cached.new_block_ids.append(plan.new_blocks[r.request_id])  # the whole table: it replaces the old
            cached.num_computed_tokens.append(r.num_computed_tokens)
        num_sched = plan.num_sched
        total = self.options.max_num_batched_tokens - plan.budget
        out = SchedulerOutput(
            scheduled_new_reqs=new_data,
            scheduled_cached_reqs=cached,
            num_scheduled_tokens=num_sched,
            total_num_scheduled_tokens=total,
            finished_req_ids=self.finished_req_ids,
            preempted_req_ids=plan.preempted,
            scheduled_spec_decode_tokens=plan.spec_tokens,
            scheduled_encoder_inputs=plan.encoder_inputs,
            free_encoder_input_ids=self.encoder_cache.take_freed(),
        )
        self.finished_req_ids = set()
        requests = self.requests
        placeholders = self.async_scheduling
        for rid, n in num_sched.items():
            req = requests[rid]
            req.num_computed_tokens += n
            if placeholders and req.num_computed_tokens >= len(req.all_token_ids) + req.num_output_placeholders:
                req.num_output_placeholders += 1  # this step samples: its token is unknown until updated
        self._step_tokens = total
        self.step_count += 1
        return out

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        finished: list[Request] = []
        requests, index = self.requests, runner_output.req_id_to_index
        sampled_ids, all_logprobs = runner_output.sampled_token_ids, runner_output.logprobs
        kv = self.kv
        caching = kv.enable_caching
        spec, spec_sched = self.spec, scheduler_output.scheduled_spec_decode_tokens
        pooled = runner_output.pooler_output
        for rid in scheduler_output.num_scheduled_tokens:
            req = requests.get(rid)
            if req is None:
                continue
            i = index.get(rid)
            sampled = sampled_ids[i] if i is not None else None
            if req.status is not _RUNNING:
                if sampled and req.num_output_placeholders:  # preempted while its token was on the device
                    out = self._fold_preempted(req, sampled[0], all_logprobs[i] if all_logprobs else None)
                    if out is not None:
                        outputs.append(out)
                continue
            if req.num_output_placeholders:
                req.num_output_placeholders = max(0, req.num_output_placeholders - len(sampled or ()))
            if pooled is not None and rid in pooled:  # a pooling request ends with its prompt: nothing to sample
                req.status = RequestStatus.FINISHED_STOPPED
                outputs.append(EngineCoreOutput(rid, [], finish_reason=req.status.finish_reason,
                                                num_cached_tokens=max(req.num_cached_tokens, 0),
                                                pooling_output=pooled[rid]))
                finished.append(req)
                continue
            if req.mm_features:
                self.encoder_cache.free_computed(req)
            if not sampled:
                # the step computed these tokens: full blocks among them may now be shared
                if caching:
                    kv.cache_computed(req)
                continue
            drafts = spec_sched.get(rid)
            if drafts:
                spec.rollback(req, len(drafts), len(sampled))
            new_tokens: list[int] = []
            for tok in sampled:
                req.output_token_ids.append(tok)
                req.all_token_ids.append(tok)
                new_tokens.append(tok)
                if self._check_stop(req, tok):
                    break
            if spec is not None:  # KV past the last known token is unverified (drafts) or the proposer's
                req.num_computed_tokens = min(req.num_computed_tokens, req.num_tokens - 1)
                if req.status is _RUNNING and (drafts or spec.lookahead):
                    kv.free_tail(req, kept_blocks(req.num_tokens, kv.block_size))
            if caching:
                kv.cache_computed(req)
            lps = all_logprobs[i] if all_logprobs else None
            if lps is not None:
                lps = lps[:len(new_tokens)]
                req.logprobs.extend(lps)
            out = EngineCoreOutput(rid, new_tokens, new_logprobs=lps, num_cached_tokens=max(req.num_cached_tokens, 0))
            if runner_output.prompt_logprobs:
                out.prompt_logprobs = runner_output.prompt_logprobs.get(rid)
            if req.status is not _RUNNING:
                out.finish_reason = req.status.finish_reason
                out.stop_reason = req.stop_reason
                finished.append(req)
            outputs.append(out)
        if spec is not None:
            spec.take_proposals(runner_output)
        if finished:
            self.running = [r for r in self.running if r.status is _RUNNING]
            for req in finished:
                self._release(req)
        return outputs

    def _fold_preempted(self, req: Request, token: int, logprobs: list | None) -> EngineCoreOutput | None:
        """Async scheduling: the token a request sampled in the step before it was preempted is valid output
        (its context was complete); keep it, and finish the request if the token ends it."""
        req.num_output_placeholders -= 1
        if req.status is not _PREEMPTED:
            return None
        req.append_output_token(token)
        if logprobs:
            req.logprobs.extend(logprobs[:1])
        out = EngineCoreOutput(req.request_id, [token], new_logprobs=logprobs[:1] if logprobs else None,
                               num_cached_tokens=max(req.num_cached_tokens, 0))
        if self._check_stop(req, token):
            self.waiting.remove(req)
            out.finish_reason = req.status.finish_reason
            out.stop_reason = req.stop_reason
            self._release(req)
        return out

    def _check_stop(self, req: Request, token: int) -> bool:
        """Finish `req` if `token` (just appended) ends it; True when it did."""
        sp = req.sampling_params
        if token == req.eos_token_id and not sp.ignore_eos:
            req.status = RequestStatus.FINISHED_STOPPED
        elif sp.stop_token_ids and token in sp.stop_token_ids:
            req.status = RequestStatus.FINISHED_STOPPED
            req.stop_reason = token
        elif len(req.output_token_ids) >= sp.max_tokens or len(req.all_token_ids) >= self.context.max_model_len:
            req.status = RequestStatus.FINISHED_LENGTH
        else:
            return False
        return True

    def _release(self, req: Request) -> None:
        self.kv.free(req)
        if req.mm_features:  # the runner drops a finished request's encoder outputs itself
            self.encoder_cache.forget(req.request_id)
        self.finished_req_ids.add(req.request_id)
        del self.requests[req.request_id]

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[EngineCoreOutput]:
        assert status.finished, f"finish_requests needs a finished status (got {status.name})"
        outs = []
        for rid in ([request_ids] if isinstance(request_ids, str) else request_ids):
            req = self.requests.get(rid)
            if req is None or req.is_finished():
                continue
            queue = self.running if req.status == RequestStatus.RUNNING else self.waiting
            queue.remove(req)
            req.status = status
            self._release(req)
            outs.append(EngineCoreOutput(rid, [], finish_reason=status.finish_reason,
                                         num_cached_tokens=max(req.num_cached_tokens, 0)))
        return outs

    def get_stats(self) -> SchedulerStats:
        kv = self.kv.stats()
        return SchedulerStats(
            num_running=len(self.running), num_waiting=len(self.waiting), num_preempted=self._step_preemptions,
            kv_usage=kv.usage, prefix_hit_rate=kv.prefix_hit_rate, num_cached_blocks=kv.num_cached_blocks,
            num_scheduled_tokens=self._step_tokens, step=self.step_count, num_used_blocks=kv.num_used_blocks,
            num_total_blocks=kv.num_total_blocks,
            num_active_loras=self.context.lora.num_active(self.running) if self.context.lora is not None else 0,
            num_output_placeholders=sum(r.num_output_placeholders for r in self.running),
            **(self._spec_stats() if self.spec is not None else {}))

    def _spec_stats(self) -> dict:
        spec = self.spec
        return dict(spec_num_draft_tokens=spec.num_drafts, spec_num_accepted_tokens=spec.num_accepted,
                    spec_acceptance_rate=spec.acceptance_rate, spec_mean_accepted_length=spec.mean_accepted_length,
                    spec_proposer_time_s=spec.proposer_time_s)
