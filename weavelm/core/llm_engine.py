"""LLMEngine, the synchronous frontend (vLLM v1's triad): `add_request` = input processor -> output processor ->
core; `step` = core outputs -> output processor -> stop-string aborts back to the core. `LLM`, the offline API on
top of it, lives in core/llm.py."""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from weavelm.core.client import EngineCoreClient
from weavelm.core.config import EngineConfig
from weavelm.core.input_processor import InputProcessor, Prepared, PromptType
from weavelm.core.output_processor import Outbox, OutputProcessor
from weavelm.core.outputs import RequestOutput
from weavelm.core.registry import Registry
from weavelm.core.request import SamplingParams, show_value
from weavelm.errors import RequestError


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


class LLMEngine:
    """Turns prompts into core requests and core outputs into RequestOutputs, for blocking callers. Several
    threads may use it: one at a time drives the core (a lock), and each consumer's outputs reach it through its
    `Outbox` whoever stepped."""

    def __init__(self, config: EngineConfig, registry: Registry | None = None, core_attachment: Any = None):
        """`core_attachment` (a `core_process.CoreAttachment`): join an engine-core process started elsewhere."""
        registry = registry or Registry.load()
        self.config = config
        self.registry = registry
        self.processor = InputProcessor(config, registry)
        self.client = EngineCoreClient.make_client(
            config, registry, multiprocess_mode=config.engine_process or core_attachment is not None,
            asyncio_mode=False, attachment=core_attachment, loader=self.processor.loader)
        self.processor.set_max_model_len(self.client.max_model_len, self.client.model_info)
        self.output_processor = OutputProcessor(self.processor.tokenizer, registry.hook)
        self._counter = itertools.count()
        self._lock = threading.Lock()  # one caller at a time drives the core
        self._deferred_aborts: deque[tuple[str, bool]] = deque()  # (request id, discard its outputs)
        self._unclaimed: list[RequestOutput] = []  # outputs for step()'s caller, produced while another drove

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.processor.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size

    def prepare(self, prompt: PromptType, params: SamplingParams | None = None) -> Prepared:
        """Tokenize and validate a whole request without queueing anything; raises RequestError."""
        return self.processor.prepare(prompt, params)

    def get_default_sampling_params(self) -> SamplingParams:
        return self.processor.get_default_sampling_params()

    def new_request_id(self) -> str:
        return str(next(self._counter))

    def add_request(self, prompt: PromptType, params: SamplingParams | None = None,
                    request_id: str | None = None, outbox: Outbox | None = None, lora_request: Any = None) -> str:
        """Validate and queue a request; raises RequestError (nothing is queued) when it is invalid or the core
        can never schedule it. Outputs go to `outbox` when given, else to the caller of `step()`."""
        return self.submit(self.prepare(prompt, params), request_id, outbox=outbox, lora_request=lora_request)

    def submit(self, prepared: Prepared, request_id: str | None = None, *, outbox: Outbox | None = None,
               lora_request: Any = None) -> str:
        """Queue a request from `prepare()` on the LoRA adapter `lora_request` (None: the base model); raises
        RequestError (nothing kept) when the core rejects it."""
        if request_id is not None and not isinstance(request_id, str):
            raise RequestError(f"request_id: must be a str (got {show_value(request_id)})")
        text, ids, params, mm_features = prepared
        with self._lock:
            rid = request_id or self.new_request_id()
            requests = self.output_processor.add_request(rid, text, ids, params, outbox=outbox,
                                                         eos_token_id=self.processor.eos_token_id,
                                                         lora_request=lora_request, mm_features=mm_features)
            added = []
            try:
                for request in requests:
                    self.client.add_request(request)
                    added.append(request.request_id)
            except BaseException:
                self.output_processor.forget(rid)
                self.client.abort_requests(added)
                raise
        return rid

    def abort_request(self, request_ids: str | Sequence[str], *, discard: bool = False) -> None:
        """Abort requests (unknown or finished ids are ignored) and free their KV blocks; each one's final output
        (finish_reason "abort") comes from a later step, to its consumer, unless `discard` (the consumer is gone).
        Safe from any thread and from a generator's `finally`: while another caller is stepping, the abort is
        applied right before the next step."""
        ids = [request_ids] if isinstance(request_ids, str) else request_ids
        if not isinstance(ids, (list, tuple, set)) or not all(isinstance(r, str) for r in ids):
            raise RequestError(f"request_ids: must be a str or a list of str (got {show_value(request_ids)})")
        self._deferred_aborts.extend((rid, discard) for rid in ids)
        if self._lock.acquire(blocking=False):
            try:
                self._apply_aborts()
            finally:
                self._lock.release()

    def _apply_aborts(self) -> None:
        ids = []
        while self._deferred_aborts:
            rid, discard = self._deferred_aborts.popleft()
            ids += self.output_processor.core_request_ids([rid])
            if discard:
                self.output_processor.forget(rid)
        if ids:
            self.client.abort_requests(ids)

    def has_unfinished_requests(self) -> bool:
        """Whether a request is unfinished or step() still has outputs to hand out."""
        return bool(self.output_processor.has_unfinished_requests() or self._unclaimed)

    def get_stats(self) -> EngineStats:
        """Current load of the core (pending aborts applied first)."""
        with self._lock:
            self._apply_aborts()
            return engine_stats(self.client.get_stats())

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None,
                       ranks: list[int] | None = None) -> list[Any]:
        with self._lock:
            return self.client.collective_rpc(method, args, kwargs, ranks)

    def add_lora(self, lora_request: Any) -> bool:
        """vLLM's `add_lora`: check the adapter (LoRAError naming the problem) and make it selectable by its name;
        False when this very adapter is added already."""
        with self._lock:
            return self.client.call_utility("add_lora", lora_request)

    def remove_lora(self, lora: int | str) -> bool:
        """vLLM's `remove_lora`, by id (or name): False when no adapter has it. Requests running on it finish;
        new ones on it are refused until it is added again."""
        with self._lock:
            return self.client.call_utility("remove_lora", lora)

    def list_loras(self) -> set[int]:
        """vLLM's `list_loras`: the ids of the adapters selectable by name (configured or added)."""
        with self._lock:
            return {r.lora_int_id for r in self.client.call_utility("lora_adapters").values()}

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
        self._apply_aborts()
        core_outputs = self.client.get_output()
        processed = self.output_processor.process_outputs(
            core_outputs, finished_only=finished_only, delta=delta,
            core_idle=not self.client.has_unfinished_requests())
        if processed.reqs_to_abort:
            self.client.abort_requests(processed.reqs_to_abort)
        return outs + processed.request_outputs

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
