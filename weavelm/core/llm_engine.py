"""The frontend engine: LLMEngine (validate, tokenize, route outputs, detokenize incrementally). `LLM`, the offline
API on top of it, lives in core/llm.py (re-exported here)."""

from __future__ import annotations

import itertools
import logging
import numbers
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from weavelm.core.client import EngineCoreClient, InprocClient
from weavelm.core.config import EngineConfig
from weavelm.core.detokenizer import IncrementalDetokenizer, add_tokens_batch
from weavelm.core.fanout import ParentRequest, child_params
from weavelm.core.generation_defaults import default_sampling_params
from weavelm.core.model_files import resolve_model
from weavelm.core.outputs import CompletionOutput, EngineCoreOutput, RequestOutput
from weavelm.core.assembly import build_loader
from weavelm.core.registry import Registry
from weavelm.core.request import Request, SamplingParams, show_value
from weavelm.errors import RequestError

logger = logging.getLogger("weavelm.llm")
PromptType = str | dict[str, Any] | list[int]


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, from `LLM.get_stats()`."""

    num_running_reqs: int
    num_waiting_reqs: int
    num_used_blocks: int  # KV blocks held by unfinished requests
    num_total_blocks: int  # size of the KV pool
    kv_cache_usage: float  # num_used_blocks / num_total_blocks
    prefix_cache_hit_rate: float  # cumulative share of queried prompt tokens found in the prefix cache
    num_active_loras: int = 0  # distinct LoRA adapters among running requests
    # speculative decoding (`speculative:`), cumulative since start; zero when it is off
    spec_num_draft_tokens: int = 0  # draft tokens verified
    spec_num_accepted_tokens: int = 0  # of those, accepted
    spec_acceptance_rate: float = 0.0  # accepted / verified drafts
    spec_mean_accepted_length: float = 0.0  # tokens emitted per verifying request-step (accepted drafts + 1)
    spec_proposer_time_s: float = 0.0  # wall time the proposer took


class Outbox:
    """The outputs of one consumer's requests (one `generate` call or one stream), deposited by whichever caller
    steps the engine. Holds the latest output per request: outputs are cumulative, so older ones are redundant."""

    def __init__(self, finished_only: bool):
        self.finished_only = finished_only
        self.outputs: dict[str, RequestOutput] = {}


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer
    token_ids: list[int]
    logprobs: list | None  # per token {token_id: Logprob}
    arrival: float
    first_token_time: float | None = None
    num_cached_tokens: int = 0
    outbox: Outbox | None = None
    parent: ParentRequest | None = None  # set on the children of an n > 1 request
    index: int = 0  # CompletionOutput.index
    prompt_logprobs: list | None = None


class LLMEngine:
    """Turns prompts into core requests and core deltas into RequestOutputs."""

    def __init__(self, config: EngineConfig, registry: Registry | None = None, core_attachment: Any = None):
        """`core_attachment` (a `mp_client.CoreAttachment`): join an engine-core process started elsewhere
        instead of building a core (`engine_process` is implied); what each API-server process of
        `weavelm serve --api-server-count N` does."""
        config.model = resolve_model(config.model)
        self.config = config
        registry = registry or Registry.load()
        self.registry = registry
        loader = build_loader(config, registry)
        self.hf_config = loader.load_hf_config(config.model)
        self.tokenizer = self._load_tokenizer(loader)
        if config.engine_process or core_attachment is not None:
            from weavelm.core.mp_client import MPClient

            self.client: EngineCoreClient = MPClient(config, registry, core_attachment)
        else:
            self.client = InprocClient(config, registry)
        self.max_model_len = self.client.max_model_len
        self.vocab_size = self.hf_config.vocab_size
        self.eos_token_id, self.extra_eos = self._eos_ids()
        self.states: dict[str, _RequestState] = {}
        self.parents: dict[str, ParentRequest] = {}  # n > 1 requests by their id; their children are in states
        self._counter = itertools.count()
        self._lock = threading.Lock()  # one caller at a time drives the core
        self._deferred_aborts: deque[str] = deque()
        self._unclaimed: list[RequestOutput] = []  # outputs for step()'s caller, produced while another drove
        self.hook = registry.hook

    def _load_tokenizer(self, loader) -> Any:
        from transformers import AutoTokenizer

        if not self.config.tokenizer:  # an explicit tokenizer wins over the one the weights carry
            tok = loader.load_tokenizer(self.config.model)
            if tok is not None:
                return tok
        path = self.config.tokenizer or self.config.model
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        except Exception as e:  # no tokenizer files: token-id prompts only
            if self.config.tokenizer:
                raise RequestError(f"tokenizer: cannot load a tokenizer from {path!r} ({e})") from e
            logger.info("no tokenizer beside %s; only token-id prompts are accepted", path)
            return None
        vocab = getattr(self.hf_config, "vocab_size", 0) or 0
        if not self.config.tokenizer and len(tok) < vocab // 2:
            # some transformers versions build an empty tokenizer from a config-only folder
            logger.warning("ignoring the tokenizer found for %s: %d tokens for a %d-token model; only token-id "
                           "prompts are accepted", path, len(tok), vocab)
            return None
        return tok

    def _eos_ids(self) -> tuple[int | None, list[int]]:
        eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
        if eos is None:
            eos = getattr(self.hf_config, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            return (eos[0] if eos else None), list(eos[1:])
        return eos, []

    # -- requests -----------------------------------------------------------------------------------------
    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """A prompt's text (None for token ids) and token ids. A str is text; a list or tuple holds token ids; a
        dict has `prompt` (text) and/or `prompt_token_ids` (which wins). Raises RequestError on any other shape."""
        if isinstance(prompt, dict):
            unknown = sorted(map(str, set(prompt) - {"prompt", "prompt_token_ids"}))
            if unknown:
                raise RequestError(f"prompt: unknown key(s) {unknown}; a dict prompt takes `prompt` and/or "
                                   f"`prompt_token_ids`")
            text = prompt.get("prompt")
            if text is not None and not isinstance(text, str):
                raise RequestError(f"prompt: must be a str (got {type(text).__name__})")
            if "prompt_token_ids" in prompt:
                return text, _token_id_list(prompt["prompt_token_ids"])
            if text is None:
                raise RequestError("prompt: a dict prompt needs `prompt` or `prompt_token_ids`")
            prompt = text
        if isinstance(prompt, (list, tuple)):
            return None, _token_id_list(prompt)
        if not isinstance(prompt, str):
            raise RequestError(f"prompt: must be a str, a token-id list or a dict (got {type(prompt).__name__})")
        if self.tokenizer is None:
            raise RequestError("prompt: this model has no tokenizer; pass {'prompt_token_ids': [...]} instead")
        try:
            return prompt, list(self.tokenizer.encode(prompt, add_special_tokens=True))
        except Exception as e:  # e.g. lone surrogates
            raise RequestError(f"prompt: the tokenizer cannot encode it ({type(e).__name__}: {e})") from e

    def validate(self, token_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Check a tokenized request; returns a re-validated copy of `params` (the caller may have changed
        fields after construction), which is what the engine runs."""
        if not isinstance(params, SamplingParams):
            raise RequestError(f"sampling_params: expected SamplingParams (got {type(params).__name__})")
        params = replace(params)
        if not token_ids:
            raise RequestError("prompt: is empty; give at least one token")
        if len(token_ids) >= self.max_model_len:
            raise RequestError(f"prompt: has {len(token_ids)} tokens but max_model_len is {self.max_model_len} "
                               f"(one position must stay free for output); shorten the prompt or raise "
                               f"max_model_len")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"prompt_token_ids: {show_value(bad[:5])} outside the vocabulary "
                               f"[0, {self.vocab_size})")
        if self.extra_eos and not params.ignore_eos:
            params.stop_token_ids = params.stop_token_ids + self.extra_eos
        self._validate_extras(params)
        return params

    def _validate_extras(self, params: SamplingParams) -> None:
        """Check the vocabulary-dependent fields and fill the engine-set ones (min_tokens' stop ids, bad words'
        token sequences)."""
        vocab = self.vocab_size
        bad = [t for t in (params.logit_bias or {}) if t >= vocab]
        if bad:
            raise RequestError(f"SamplingParams.logit_bias: token id(s) {show_value(bad[:5])} outside the "
                               f"vocabulary [0, {vocab})")
        stop_ids = [] if params.ignore_eos or self.eos_token_id is None else [self.eos_token_id]
        params.min_tokens_stop_ids = [t for t in stop_ids + params.stop_token_ids if t < vocab] \
            if params.min_tokens else []
        params.bad_words_token_ids = self._bad_words_ids(params.bad_words) if params.bad_words else []

    def _bad_words_ids(self, words: list[str]) -> list[list[int]]:
        """vLLM's tokenization of bad words: each word as given and with a leading space when that makes a
        different token sequence of the same length."""
        if self.tokenizer is None:
            raise RequestError("SamplingParams.bad_words: this model has no tokenizer to turn words into tokens")
        out: list[list[int]] = []
        for word in words:
            plain = list(self.tokenizer.encode(word, add_special_tokens=False))
            spaced = list(self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            for ids in (plain, spaced) if spaced[:1] != plain[:1] and len(spaced) == len(plain) else (plain,):
                if ids and all(0 <= t < self.vocab_size for t in ids):
                    out.append(ids)
        return out

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams from the model's generation_config.json (vLLM's keys), else SamplingParams()."""
        if not hasattr(self, "_default_params"):
            self._default_params = default_sampling_params(self.config.model)
        return replace(self._default_params)

    def prepare(self, prompt: PromptType, params: SamplingParams | None = None
                ) -> tuple[str | None, list[int], SamplingParams]:
        """Tokenize and validate a whole request without queueing anything; raises RequestError."""
        text, ids = self.tokenize(prompt)
        return text, ids, self.validate(ids, SamplingParams() if params is None else params)

    def add_request(self, prompt: PromptType, params: SamplingParams | None = None,
                    request_id: str | None = None, outbox: Outbox | None = None, lora_request: Any = None) -> str:
        """Validate and queue a request; raises RequestError (nothing is queued) when it is invalid or the core
        can never schedule it. Outputs go to `outbox` when given, else to the caller of `step()`."""
        return self.submit(self.prepare(prompt, params), request_id, outbox, lora_request)

    def submit(self, prepared: tuple[str | None, list[int], SamplingParams], request_id: str | None = None,
               outbox: Outbox | None = None, lora_request: Any = None) -> str:
        """Queue a request from `prepare()`, on the LoRA adapter `lora_request` (None: the base model); raises
        RequestError (nothing kept) when the core rejects it."""
        if request_id is not None and not isinstance(request_id, str):
            raise RequestError(f"request_id: must be a str (got {show_value(request_id)})")
        text, ids, params = prepared
        with self._lock:
            rid = request_id or str(next(self._counter))
            if rid in self.states or rid in self.parents:
                raise RequestError(f"request_id: {rid!r} is already in use")
            if params.n == 1:
                self._add(rid, text, ids, params, outbox, lora_request=lora_request)
                return rid
            parent = ParentRequest(rid, params.n)
            added: list[str] = []
            try:
                for i, child_id in enumerate(parent.child_ids):
                    if child_id in self.states:
                        raise RequestError(f"request_id: {child_id!r} (completion {i} of {rid!r}) is already in use")
                    self._add(child_id, text, ids, child_params(params, i), outbox, parent, i, lora_request)
                    added.append(child_id)
            except BaseException:
                for child_id in added:
                    self.states.pop(child_id, None)
                self.client.abort_requests(added)
                raise
            self.parents[rid] = parent
        return rid

    def _add(self, rid: str, text: str | None, ids: list[int], params: SamplingParams, outbox: Outbox | None,
             parent: ParentRequest | None = None, index: int = 0, lora_request: Any = None) -> None:
        self.client.add_request(Request(rid, ids, params, eos_token_id=self.eos_token_id, lora_request=lora_request))
        detok = IncrementalDetokenizer(self.tokenizer, ids, params.stop, params.include_stop_str_in_output)
        self.states[rid] = _RequestState(rid, text, ids, params, detok, [],
                                         [] if params.num_logprobs is not None else None, time.perf_counter(),
                                         outbox=outbox, parent=parent, index=index)

    def abort_request(self, request_ids: str | Sequence[str]) -> list[RequestOutput]:
        """Abort requests (unknown or finished ids are ignored) and free their KV blocks. Each aborted request's
        final output (finish_reason "abort") goes to its consumer; those of requests added without an outbox are
        returned. Safe from any thread and from a generator's `finally`: while another caller is stepping (or
        this thread is inside a step), the abort is applied right before the next step and [] is returned."""
        ids = [request_ids] if isinstance(request_ids, str) else request_ids
        if not isinstance(ids, (list, tuple, set)) or not all(isinstance(r, str) for r in ids):
            raise RequestError(f"request_ids: must be a str or a list of str (got {show_value(request_ids)})")
        parents = self.parents
        self._deferred_aborts.extend(c for r in ids for c in (parents[r].child_ids if r in parents else (r,)))
        if not self._lock.acquire(blocking=False):
            return []
        try:
            return self._apply_aborts()
        finally:
            self._lock.release()

    def _apply_aborts(self) -> list[RequestOutput]:
        ids = []
        while self._deferred_aborts:
            ids.append(self._deferred_aborts.popleft())
        if not ids:
            return []
        return [o for o in (self._process(c) for c in self.client.abort_requests(ids)) if o is not None]

    def has_unfinished_requests(self) -> bool:
        """Whether a request is unfinished or step() still has outputs to hand out."""
        return bool(self.states or self._unclaimed)

    def get_stats(self) -> EngineStats:
        """Current load of the core (pending aborts applied first)."""
        with self._lock:
            self._unclaimed.extend(self._apply_aborts())
            if not self.client.thread_safe:
                return engine_stats(self.client.get_stats())
        # a thread-safe client is asked outside the lock: an AsyncLLM reading its outputs needs the lock to file
        # them, and this result arrives through that reader
        return engine_stats(self.client.get_stats())

    def step(self, finished_only: bool = False, delta: bool = False) -> list[RequestOutput]:
        """Run one core step. Outputs of requests added with an outbox (LLM.generate / LLM.stream) go to it;
        the others are returned: one RequestOutput per request that changed; with `finished_only` only for
        requests that finished; with `delta` each output's token_ids (and logprobs) hold only this step's new
        tokens (text stays cumulative). Both avoid per-step copies of growing outputs."""
        with self._lock:
            return self._step(finished_only, delta)

    def collect(self, outbox: Outbox) -> list[RequestOutput]:
        """Drive the engine for one consumer: step unless `outbox` already holds outputs (another caller may
        have stepped meanwhile), then take them. Threads wait for each other here; nobody spins."""
        with self._lock:
            if not outbox.outputs:
                unclaimed = self._step(False, False)  # (_step swaps self._unclaimed)
                self._unclaimed.extend(unclaimed)
            outs = list(outbox.outputs.values())
            outbox.outputs.clear()
        return outs

    def _step(self, finished_only: bool, delta: bool) -> list[RequestOutput]:
        outs, self._unclaimed = self._unclaimed, []
        outs += self._apply_aborts()
        outs += self._process_batch(self.client.get_output(), finished_only, delta)
        return outs

    def process_outputs(self, batch: list[EngineCoreOutput], delta: bool = True) -> list[RequestOutput]:
        """Fold a batch of core outputs read by someone else than `step()` (AsyncLLM's reader of an engine-core
        process, after `client.took(batch)`): the RequestOutputs of requests added without an outbox, plus the
        final outputs of aborts applied first."""
        with self._lock:
            return self._apply_aborts() + self._process_batch(batch, False, delta)

    def _process_batch(self, batch: list[EngineCoreOutput], finished_only: bool, delta: bool
                       ) -> list[RequestOutput]:
        core_outs = [co for co in batch if co.request_id in self.states]
        core_outs += self._lost_requests(core_outs)
        hits = add_tokens_batch([(self.states[co.request_id].detok, co.new_token_ids) for co in core_outs])
        outs = []
        for co, hit in zip(core_outs, hits):
            ro = self._process(co, finished_only, delta, hit)
            if ro is not None:
                outs.append(ro)
        return outs

    def _lost_requests(self, core_outs: list[EngineCoreOutput]) -> list[EngineCoreOutput]:
        """Error outputs for requests the core no longer holds without having finished them, so no consumer
        waits for them forever (an internal failure; logged)."""
        if self.client.has_unfinished_requests():
            return []
        finishing = {co.request_id for co in core_outs if co.finished}
        lost = [rid for rid in self.states if rid not in finishing]
        if lost:
            logger.error("the engine core dropped requests %s without finishing them", lost[:5])
        return [EngineCoreOutput(rid, [], finish_reason="error", error="the engine core dropped this request")
                for rid in lost]

    def _process(self, co: EngineCoreOutput, finished_only: bool = False, delta: bool = False,
                 hit: str | None | object = ...) -> RequestOutput | None:
        """Fold one core delta into the request's state; `hit` is the stop string found by a batched
        detokenization of this delta (`...`: detokenize here). A request with an outbox gets its output there
        (with the outbox's own `finished_only`, cumulative) and None is returned."""
        st = self.states.get(co.request_id)
        if st is None:
            return None
        if st.outbox is not None:
            finished_only, delta = st.outbox.finished_only, False
        now = time.perf_counter()
        if co.new_token_ids and st.first_token_time is None:
            st.first_token_time = now
        st.token_ids.extend(co.new_token_ids)
        st.num_cached_tokens = co.num_cached_tokens
        if st.logprobs is not None and co.new_logprobs:
            st.logprobs.extend(co.new_logprobs)
        if co.prompt_logprobs is not None:
            st.prompt_logprobs = co.prompt_logprobs
        finish_reason, stop_reason = co.finish_reason, co.stop_reason
        if hit is ...:
            hit = st.detok.add_tokens(co.new_token_ids)
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
                self.client.abort_requests([co.request_id])
            finish_reason, stop_reason = "stop", hit
        if finished_only and finish_reason is None:
            return None
        out = RequestOutput(
            request_id=st.request_id, prompt=st.prompt, prompt_token_ids=st.prompt_token_ids,
            outputs=[CompletionOutput(
                st.index, st.detok.text, list(co.new_token_ids) if delta else list(st.token_ids), finish_reason,
                stop_reason, (list(co.new_logprobs or []) if delta else list(st.logprobs))
                if st.logprobs is not None else None)],
            finished=finish_reason is not None, num_cached_tokens=st.num_cached_tokens,
            error=co.error,
            metrics={"arrival": st.arrival, "first_token": st.first_token_time or 0.0, "now": now},
            prompt_logprobs=co.prompt_logprobs if delta else st.prompt_logprobs)
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

    def shutdown(self) -> None:
        self.client.shutdown()


def engine_stats(s: Any) -> EngineStats:
    """EngineStats from the core's SchedulerStats."""
    return EngineStats(s.num_running, s.num_waiting, s.num_used_blocks, s.num_total_blocks, s.kv_usage,
                       s.prefix_hit_rate, s.num_active_loras, spec_num_draft_tokens=s.spec_num_draft_tokens,
                       spec_num_accepted_tokens=s.spec_num_accepted_tokens,
                       spec_acceptance_rate=s.spec_acceptance_rate,
                       spec_mean_accepted_length=s.spec_mean_accepted_length,
                       spec_proposer_time_s=s.spec_proposer_time_s)


def error_output(prompt: Any, err: Exception, request_id: str) -> RequestOutput:
    """The finished output of a request rejected before it was queued (what can be shown of its prompt)."""
    text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
    text = text if isinstance(text, str) else None
    ids = prompt.get("prompt_token_ids", []) if isinstance(prompt, dict) else []
    ids = ids if isinstance(ids, list) and all(_is_token_id(t) for t in ids) else []
    return RequestOutput(request_id, text, [int(t) for t in ids], [CompletionOutput(0, "", [], "error")], True,
                         error=str(err))


def _is_token_id(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _token_id_list(value: Any) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(_is_token_id(t) for t in value):
        raise RequestError(f"prompt_token_ids: must be a list of integer token ids (got {show_value(value)})")
    return [int(t) for t in value]


def __getattr__(name: str) -> Any:  # `from weavelm.core.llm_engine import LLM` keeps working
    if name == "LLM":
        from weavelm.core.llm import LLM
        return LLM
    raise AttributeError(name)
