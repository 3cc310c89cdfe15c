"""AsyncLLM: the asyncio frontend (vLLM's `AsyncLLM`). An input processor, an output processor and an async engine-core
client (`EngineCoreClient.make_client(..., asyncio_mode=True)`: the core in its own process, or in this one stepped
by the client's thread). One output task of the event loop awaits the client's outputs, detokenizes them and feeds
the request streams; requests are sent from the event loop. There is no mode flag: both clients have the same verbs.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from weavelm.core.client import EngineCoreClient
from weavelm.core.config import EngineConfig
from weavelm.core.input_processor import InputProcessor, PromptType
from weavelm.core.llm import build_engine_config
from weavelm.core.llm_engine import EngineStats, engine_stats
from weavelm.core.output_processor import OutputProcessor
from weavelm.core.outputs import CompletionOutput, RequestOutput
from weavelm.core.registry import Registry
from weavelm.core.request import SamplingParams
from weavelm.errors import EngineDeadError, EngineError, RequestError

logger = logging.getLogger("weavelm.async_llm")
OUTPUT_CHUNK = 128  # the output task folds a batch this many outputs at a time, letting the event loop run between


class _Choice:
    """One completion's state inside a stream, folded from the engine's per-step deltas."""

    __slots__ = ("token_ids", "logprobs", "text", "finish_reason", "stop_reason", "sent_tokens", "sent_text",
                 "cumulative_logprob")

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.logprobs: list | None = None
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.sent_tokens = 0
        self.sent_text = 0
        self.cumulative_logprob: float | None = None  # the whole completion's, as the output processor sums it


class RequestStream:
    """The outputs of one request. The output task pushes the engine's delta outputs (each step's new token ids
    and logprobs, the text so far), so it never copies a growing output;
    iterating yields either deltas (`delta=True`: text, token ids and logprobs new since the previous yield) or
    cumulative outputs, coalescing whatever arrived meanwhile into one. Timestamps (`time.perf_counter()`) are
    taken when outputs reach the event loop."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, delta: bool):
        self.request_id = request_id
        self.loop = loop
        self.delta = delta
        self.accepted: asyncio.Future = loop.create_future()
        self.finished = False
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.num_prompt_tokens = 0
        self.num_output_tokens = 0
        # observer(stream, output, new_tokens, previous_token_time, now), for metrics
        self.observer: Callable[[RequestStream, RequestOutput, int, float | None, float], None] | None = None
        self._items: deque[RequestOutput | BaseException] = deque()
        self._ready = asyncio.Event()
        self._choices: dict[int, _Choice] = {}
        self._changed: set[int] = set()
        self._prompt_logprobs: list | None = None  # arrives once, with the first output
        self._prompt_logprobs_sent = False
        self._pooling_output: list[float] | None = None  # a pooling request's embedding, with its final output
        self.on_first_output: Callable[[], None] | None = None

    def push(self, item: RequestOutput | BaseException) -> None:
        """Called by the output task with one engine delta output (or the error that ends the stream)."""
        if isinstance(item, RequestOutput):
            now = time.perf_counter()
            new_tokens, previous = sum(len(c.token_ids) for c in item.outputs), self.last_token_time
            if new_tokens > 0:
                self.first_token_time = self.first_token_time or now
                self.last_token_time = now
                self.num_output_tokens += new_tokens
            if self.observer is not None:
                self.observer(self, item, new_tokens, previous, now)
        if self.on_first_output is not None:
            self.on_first_output()
            self.on_first_output = None
        self._items.append(item)
        self._ready.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        last = None
        while self._items:
            item = self._items.popleft()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            self._fold(item)
            last = item
            if item.finished:
                self._items.clear()
                break
        return self._emit(last)

    def _fold(self, out: RequestOutput) -> None:
        self.num_prompt_tokens = len(out.prompt_token_ids)
        if getattr(out, "prompt_logprobs", None) is not None:
            self._prompt_logprobs = out.prompt_logprobs
        if out.pooling_output is not None:
            self._pooling_output = out.pooling_output
        for comp in out.outputs:
            choice = self._choices.get(comp.index)
            if choice is None:
                choice = self._choices[comp.index] = _Choice()
            choice.token_ids += comp.token_ids
            if comp.logprobs is not None:
                if choice.logprobs is None:
                    choice.logprobs = []
                choice.logprobs.extend(comp.logprobs)
            choice.text, choice.finish_reason, choice.stop_reason = comp.text, comp.finish_reason, comp.stop_reason
            choice.cumulative_logprob = comp.cumulative_logprob
            self._changed.add(comp.index)

    def _emit(self, out: RequestOutput) -> RequestOutput:
        self.finished = out.finished
        completions = []
        for index in sorted(self._changed if self.delta else self._choices):
            c = self._choices[index]
            if self.delta:
                text, ids = c.text[c.sent_text:], c.token_ids[c.sent_tokens:]
                logprobs = c.logprobs[c.sent_tokens:] if c.logprobs is not None else None
            else:
                text, ids = c.text, list(c.token_ids)
                logprobs = list(c.logprobs) if c.logprobs is not None else None
            c.sent_text, c.sent_tokens = len(c.text), len(c.token_ids)
            completions.append(CompletionOutput(index, text, ids, c.finish_reason, c.stop_reason, logprobs,
                                                c.cumulative_logprob))
        self._changed.clear()
        extra = {}
        if self._prompt_logprobs is not None and not (self.delta and self._prompt_logprobs_sent):
            extra["prompt_logprobs"] = self._prompt_logprobs  # deltas carry them once, cumulative outputs always
            self._prompt_logprobs_sent = True
        if self._pooling_output is not None:
            extra["pooling_output"] = self._pooling_output
        return RequestOutput(out.request_id, out.prompt, out.prompt_token_ids, completions, out.finished,
                             out.num_cached_tokens, out.error, out.metrics, **extra)


class AsyncLLM:
    """`AsyncLLM(model=..., **overrides)` takes `LLM`'s arguments (`config=`, `sets=`, vLLM's flat names).

    `async for out in engine.generate(prompt, params)` streams one request; cancelling the consuming task or
    closing the generator aborts it. A dead engine (its process or thread) makes every waiting and later call raise
    EngineDeadError. Use it from one event loop at a time (a later loop takes over once the first has ended);
    `shutdown()` stops the core."""

    def __init__(self, model: str | None = None, *, config: str | EngineConfig | dict | None = None,
                 sets: list[str] | None = None, registry: Registry | None = None, core_attachment: Any = None,
                 **overrides: Any):
        engine_config, registry = build_engine_config(model, config, sets, registry, overrides)
        self.config = engine_config
        self.processor = InputProcessor(engine_config, registry)
        self.client = EngineCoreClient.make_client(
            engine_config, registry, multiprocess_mode=engine_config.engine_process or core_attachment is not None,
            asyncio_mode=True, attachment=core_attachment, loader=self.processor.loader)
        self.processor.set_max_model_len(self.client.max_model_len, self.client.model_info)
        self.output_processor = OutputProcessor(self.processor.tokenizer, registry.hook)
        self._streams: dict[str, RequestStream] = {}  # by request id, until their final output
        self._open: dict[str, RequestStream] = {}  # the streams not yet finished or released
        self._handler: asyncio.Task | None = None
        self._num_waiting = 0
        self.output_observer: Callable[[RequestStream, RequestOutput, int, float | None, float], None] | None = None
        self._dead: EngineDeadError | None = None
        self._stopping = False

    # -- public API -----------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def get_tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.processor.max_model_len

    def get_default_sampling_params(self) -> SamplingParams:
        """The model's generation_config.json defaults (see `LLM.get_default_sampling_params`)."""
        return self.processor.get_default_sampling_params()

    @property
    def errored(self) -> bool:
        return self._dead is not None

    @property
    def dead_error(self) -> EngineDeadError | None:
        return self._dead

    @property
    def num_unfinished(self) -> int:
        """Requests added through this AsyncLLM and not yet finished (or abandoned)."""
        return len(self._open)

    @property
    def num_waiting(self) -> int:
        """Requests added and not yet given any output."""
        return self._num_waiting

    def check_health(self) -> None:
        """Raise EngineDeadError when the engine core (its process or thread) has died."""
        if self._dead is None and not self._stopping:
            try:
                self.client.check_health()
            except EngineDeadError as e:
                self._die(e)
        if self._dead is not None:
            raise self._dead

    async def add_request(self, prompt: PromptType, params: SamplingParams | None = None,
                          request_id: str | None = None, *, delta: bool = False,
                          lora_request: Any = None) -> RequestStream:
        """Validate (RequestError) and queue a request on `lora_request` (None: the base model); returns its
        stream, which the caller must iterate to the end or `release`. A request the core refuses ends its stream
        with an output whose `error` is set."""
        self.check_health()
        text, ids, params, mm_features = self.processor.prepare(prompt, params)
        rid = request_id if request_id is not None else f"req-{uuid.uuid4().hex}"
        if not isinstance(rid, str):
            raise RequestError(f"request_id: must be a str (got {type(rid).__name__})")
        if rid in self._streams:
            raise RequestError(f"request_id: {rid!r} is already in use")
        requests = self.output_processor.add_request(rid, text, ids, params, lora_request=lora_request,
                                                     eos_token_id=self.processor.eos_token_id,
                                                     mm_features=mm_features)
        stream = RequestStream(rid, asyncio.get_running_loop(), delta)
        stream.observer = self.output_observer
        self._num_waiting += 1
        stream.on_first_output = self._left_waiting
        self._streams[rid] = self._open[rid] = stream
        try:
            for request in requests:
                await self.client.add_request_async(request)
            self._ensure_output_handler()
        except BaseException:
            self._forget(stream, abort=True)
            del self._streams[rid]
            self.output_processor.forget(rid)
            raise
        return stream

    async def generate(self, prompt: PromptType, params: SamplingParams | None = None,
                       request_id: str | None = None, *, delta: bool = False,
                       lora_request: Any = None) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs (cumulative, or deltas with `delta=True`), ending with the finished one.
        Raises RequestError for an invalid request and EngineDeadError when the engine dies."""
        stream = await self.add_request(prompt, params, request_id, delta=delta, lora_request=lora_request)
        try:
            async for out in stream:
                yield out
        finally:
            self.release(stream)

    def release(self, stream: RequestStream) -> None:
        """Done with a stream: aborts its request unless it finished. Safe to call twice."""
        self._forget(stream, abort=not stream.finished)

    def abort_nowait(self, request_ids: str | Sequence[str]) -> None:
        """Abort requests (unknown or finished ids are ignored); their KV blocks are freed before the next step."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for rid in ids:
            stream = self._open.get(rid)
            if stream is not None:
                self._forget(stream, abort=True)

    async def abort(self, request_ids: str | Sequence[str]) -> None:
        self.abort_nowait(request_ids)

    async def get_stats(self) -> EngineStats:
        """The engine's stats, taken by the core between steps."""
        self.check_health()
        return engine_stats(await self.client.call_utility_async("get_stats"))

    async def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None,
                             ranks: list[int] | None = None) -> list[Any]:
        """`LLM.collective_rpc`, awaited: call `method` on every worker between steps."""
        self.check_health()
        return await self.client.call_utility_async("collective_rpc", method, args, kwargs, ranks)

    async def add_lora(self, lora_request: Any) -> bool:
        """`LLM.add_lora`, awaited: the core checks the adapter (LoRAError) and makes it selectable by name."""
        self.check_health()
        return await self.client.call_utility_async("add_lora", lora_request)

    async def load_lora_adapter(self, lora_name: str, lora_path: str, replace: bool = False) -> Any:
        """Add the adapter at `lora_path` as `lora_name` under an id the core picks (unique across every API
        server of the core); returns its LoRARequest. LoRAError when it cannot serve, or the name is taken and
        not `replace` (then the adapter of that name goes once the new one passed its checks)."""
        self.check_health()
        return await self.client.call_utility_async("load_lora_adapter", lora_name, lora_path, replace)

    async def remove_lora(self, lora: int | str) -> bool:
        """`LLM.remove_lora`, awaited."""
        self.check_health()
        return await self.client.call_utility_async("remove_lora", lora)

    async def list_loras(self) -> set[int]:
        """`LLM.list_loras`, awaited."""
        return {r.lora_int_id for r in (await self.lora_adapters()).values()}

    async def lora_adapters(self) -> dict[str, Any]:
        """{name: LoRARequest} of the adapters selectable by name, as the core has them now."""
        self.check_health()
        return await self.client.call_utility_async("lora_adapters")

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort every request, stop the output task and shut the engine core down. Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        if self._dead is None and self._streams:
            try:
                self.client.abort_requests(self.output_processor.core_request_ids(list(self._streams)))
            except EngineError:
                pass
        handler = self._handler
        if handler is not None and not handler.done():
            loop = handler.get_loop()
            try:
                if _running_loop() is loop:
                    handler.cancel()
                else:
                    loop.call_soon_threadsafe(handler.cancel)
            except RuntimeError:  # its loop is closed
                pass
        try:
            self.client.shutdown()
        except Exception:  # a dead engine may fail to shut down cleanly; nothing is left to save
            logger.exception("engine shutdown failed")

    # -- the output task ------------------------------------------------------------------------------------
    def _ensure_output_handler(self) -> None:
        if self._handler is None or self._handler.done():
            self._handler = asyncio.get_running_loop().create_task(self._output_handler(),
                                                                   name="weavelm-output-handler")

    async def _output_handler(self) -> None:
        """Until cancelled: await the core's outputs, fold them into RequestOutputs (detokenized, stop strings
        applied, n > 1 merged), push them to their streams and abort what a stop string ended."""
        client, processor = self.client, self.output_processor
        try:
            while True:
                outputs = await client.get_output_async()
                for start in range(0, len(outputs), OUTPUT_CHUNK):
                    if start:
                        await asyncio.sleep(0)  # let the loop write what is ready
                    processed = processor.process_outputs(outputs[start:start + OUTPUT_CHUNK], delta=True)
                    for out in processed.request_outputs:
                        stream = self._streams.get(out.request_id)
                        if stream is not None:
                            if out.finished:
                                del self._streams[out.request_id]
                                self._open.pop(out.request_id, None)
                            stream.push(out)
                    if processed.reqs_to_abort:
                        client.abort_requests(processed.reqs_to_abort)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the core died, or the frontend's own processing failed: the engine is lost
            if not self._stopping:
                self._die(e)

    def _left_waiting(self) -> None:
        self._num_waiting -= 1

    def _forget(self, stream: RequestStream, abort: bool) -> None:
        """The consumer is done with `stream`; with `abort`, its request is aborted in the core (its final "abort"
        output still reaches the stream, for the output observer's metrics)."""
        rid = stream.request_id
        if self._open.get(rid) is stream:
            del self._open[rid]
            if stream.on_first_output is not None:  # never got an output: still counted as waiting
                stream.on_first_output()
                stream.on_first_output = None
        if abort and self._dead is None:
            try:
                self.client.abort_requests(self.output_processor.core_request_ids([rid]))
            except EngineError:
                pass

    def _die(self, error: BaseException) -> None:
        detail = "".join(traceback.format_exception(error)).rstrip()
        logger.error("the engine died:\n%s", detail)
        dead = error if isinstance(error, EngineDeadError) else EngineDeadError(
            f"the engine loop died: {type(error).__name__}: {error}")
        if not isinstance(error, EngineError):
            dead.__cause__ = error
        self._dead = dead
        streams, self._streams, self._open = list(self._streams.values()), {}, {}
        for stream in streams:
            stream.push(dead)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
