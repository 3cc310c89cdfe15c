"""OutputProcessor (vLLM v1's): turns the core's per-request deltas into RequestOutputs. It detokenizes
incrementally, finds stop strings (and names the requests the caller must abort in the core for them), merges the
children of an `n > 1` request into one output, and turns requests the core lost into error outputs. `LLMEngine` and
`AsyncLLM` each own one; it never talks to the core itself."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from weavelm.core.detokenizer import IncrementalDetokenizer, add_tokens_batch
from weavelm.core.fanout import ParentRequest, child_params
from weavelm.core.outputs import CompletionOutput, EngineCoreOutput, RequestOutput
from weavelm.core.request import Request, SamplingParams
from weavelm.errors import RequestError

logger = logging.getLogger("weavelm.llm")


class Outbox:
    """The outputs of one consumer's requests (one `generate` call or one stream), deposited by whichever caller
    steps the engine. Holds the latest output per request: outputs are cumulative, so older ones are redundant."""

    def __init__(self, finished_only: bool):
        self.finished_only = finished_only
        self.outputs: dict[str, RequestOutput] = {}


@dataclass
class RequestState:
    """One core request's frontend state (a child of an n > 1 request has its own)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    detok: IncrementalDetokenizer
    logprobs: list | None  # per token {token_id: Logprob}; None when not requested
    outbox: Outbox | None = None
    parent: ParentRequest | None = None  # set on the children of an n > 1 request
    index: int = 0  # CompletionOutput.index
    token_ids: list[int] = field(default_factory=list)
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list | None = None
    cumulative_logprob: float = 0.0  # over logprobs[:num_summed]
    num_summed: int = 0

    def sum_logprobs(self) -> float | None:
        """The chosen tokens' summed logprob (vLLM's cumulative_logprob), None when logprobs were not asked for."""
        if self.logprobs is None:
            return None
        for lp, tok in zip(self.logprobs[self.num_summed:], self.token_ids[self.num_summed:]):
            self.cumulative_logprob += float(lp[tok]) if tok in lp else 0.0
        self.num_summed = min(len(self.logprobs), len(self.token_ids))
        return self.cumulative_logprob


@dataclass
class OutputProcessorOutput:
    request_outputs: list[RequestOutput]  # for the caller (requests added without an outbox)
    reqs_to_abort: list[str]  # stopped by a stop string here: the caller aborts them in the core


class OutputProcessor:
    def __init__(self, tokenizer: Any, hook: Any):
        self.tokenizer = tokenizer
        self.hook = hook
        self.states: dict[str, RequestState] = {}
        self.parents: dict[str, ParentRequest] = {}  # n > 1 requests by their id; their children are in states
        self._token_text: dict[int, str] = {}  # token id -> its text, for Logprob.decoded_token

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                    *, eos_token_id: int | None, lora_request: Any = None, outbox: Outbox | None = None,
                    mm_features: list | None = None) -> list[Request]:
        """Track a request (fanned out into `params.n` children) and return the core requests to add (each
        carries the prompt's multimodal items, `mm_features`)."""
        if request_id in self.states or request_id in self.parents:
            raise RequestError(f"request_id: {request_id!r} is already in use")
        parent = ParentRequest(request_id, params.n) if params.n > 1 else None
        ids = parent.child_ids if parent is not None else [request_id]
        for child_id in ids:
            if child_id in self.states:
                raise RequestError(f"request_id: {child_id!r} (a completion of {request_id!r}) is already in use")
        requests = []
        for index, rid in enumerate(ids):
            child = child_params(params, index) if parent is not None else params
            requests.append(Request(rid, prompt_token_ids, child, eos_token_id=eos_token_id,
                                    lora_request=lora_request, mm_features=mm_features))
            detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, child.stop,
                                           child.include_stop_str_in_output)
            self.states[rid] = RequestState(rid, prompt, prompt_token_ids, detok,
                                            [] if child.num_logprobs is not None else None, outbox, parent, index)
        if parent is not None:
            self.parents[request_id] = parent
        return requests

    def core_request_ids(self, request_ids: list[str]) -> list[str]:
        """The core requests behind these ids (an n > 1 request's children)."""
        parents = self.parents
        return [c for r in request_ids for c in (parents[r].child_ids if r in parents else (r,))]

    def forget(self, request_id: str) -> None:
        """Drop a request the core refused (its children too)."""
        for rid in self.core_request_ids([request_id]):
            self.states.pop(rid, None)
        self.parents.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.states)

    def process_outputs(self, core_outputs: list[EngineCoreOutput], *, finished_only: bool = False,
                        delta: bool = False, core_idle: bool = False) -> OutputProcessorOutput:
        """Fold one batch of core deltas. Requests with an outbox get their outputs there (cumulative, with the
        outbox's own `finished_only`); the others are returned: with `finished_only` only finished ones, with
        `delta` each holding only this batch's new tokens (text stays cumulative). `core_idle`: the core holds no
        unfinished request, so any request still tracked here was lost and finishes with an error."""
        core_outs = [co for co in core_outputs if co.request_id in self.states]
        if core_idle:
            core_outs += self._lost_requests(core_outs)
        hits = add_tokens_batch([(self.states[co.request_id].detok, co.new_token_ids) for co in core_outs])
        result = OutputProcessorOutput([], [])
        for co, hit in zip(core_outs, hits):
            out = self._process(co, finished_only, delta, hit, result.reqs_to_abort)
            if out is not None:
                result.request_outputs.append(out)
        return result

    def _decode_logprobs(self, positions: list) -> None:
        """Fill `Logprob.decoded_token` for the tokens in these {token_id: Logprob} dicts (vLLM's: each token's
        text on its own), decoding only the ids not seen before."""
        tok = self.tokenizer
        if tok is None:
            return
        cache = self._token_text
        new = sorted({t for d in positions if d for t in d if t not in cache})
        if new:
            try:
                pieces = tok.convert_ids_to_tokens(new)
                cache.update((t, tok.convert_tokens_to_string([p]) if p is not None else "")
                             for t, p in zip(new, pieces))
            except Exception:  # a tokenizer without the slow-API methods: decode each id
                cache.update((t, tok.decode([t])) for t in new)
        for d in positions:
            for t, lp in (d or {}).items():
                if lp.decoded_token is None:
                    lp.decoded_token = cache[t]

    def _lost_requests(self, core_outs: list[EngineCoreOutput]) -> list[EngineCoreOutput]:
        finishing = {co.request_id for co in core_outs if co.finished}
        lost = [rid for rid in self.states if rid not in finishing]
        if lost:
            logger.error("the engine core dropped requests %s without finishing them", lost[:5])
        return [EngineCoreOutput(rid, [], finish_reason="error", error="the engine core dropped this request")
                for rid in lost]

    def _process(self, co: EngineCoreOutput, finished_only: bool, delta: bool, hit: str | None,
                 reqs_to_abort: list[str]) -> RequestOutput | None:
        """Fold one core delta into its request's state; `hit` is the stop string its detokenization found."""
        st = self.states[co.request_id]
        if st.outbox is not None:
            finished_only, delta = st.outbox.finished_only, False
        now = time.perf_counter()
        if co.new_token_ids and st.first_token_time is None:
            st.first_token_time = now
        st.token_ids.extend(co.new_token_ids)
        st.num_cached_tokens = co.num_cached_tokens
        if st.logprobs is not None and co.new_logprobs:
            self._decode_logprobs(co.new_logprobs)
            st.logprobs.extend(co.new_logprobs)
        if co.prompt_logprobs is not None:
            self._decode_logprobs(co.prompt_logprobs)
            st.prompt_logprobs = co.prompt_logprobs
        finish_reason, stop_reason = co.finish_reason, co.stop_reason
        if hit is not None and 1 < len(co.new_token_ids) and st.detok.num_used < len(co.new_token_ids):
            # a stop string inside a multi-token step (speculative decoding): drop the tokens after it
            extra = len(co.new_token_ids) - st.detok.num_used
            del st.token_ids[-extra:]
            co.new_token_ids = co.new_token_ids[:-extra]
            if co.new_logprobs:
                co.new_logprobs = co.new_logprobs[:-extra]
                if st.logprobs is not None:
                    del st.logprobs[-extra:]
            finish_reason = None  # the stop string came first
        if hit is not None and finish_reason is None:
            if not co.finished:
                reqs_to_abort.append(co.request_id)
            finish_reason, stop_reason = "stop", hit
        if finished_only and finish_reason is None:
            return None
        logprobs = None
        if st.logprobs is not None:
            logprobs = list(co.new_logprobs or []) if delta else list(st.logprobs)
        out = RequestOutput(
            request_id=st.request_id, prompt=st.prompt, prompt_token_ids=st.prompt_token_ids,
            outputs=[CompletionOutput(st.index, st.detok.text, list(co.new_token_ids) if delta else list(st.token_ids),
                                      finish_reason, stop_reason, logprobs, st.sum_logprobs())],
            finished=finish_reason is not None, num_cached_tokens=st.num_cached_tokens, error=co.error,
            metrics={"arrival": st.arrival, "first_token": st.first_token_time or 0.0, "now": now},
            prompt_logprobs=co.prompt_logprobs if delta else st.prompt_logprobs,
            pooling_output=co.pooling_output)  # a pooling request's embedding: with its one, final output
        if out.finished:
            del self.states[co.request_id]
        if st.parent is not None:
            out = st.parent.merge(out, finished_only, delta)
            if out is None:
                return None
            if out.finished:
                del self.parents[out.request_id]
        if out.finished:
            self.hook.weavelm_request_finished(output=out)
        if st.outbox is not None:
            st.outbox.outputs[out.request_id] = out
            return None
        return out
