"""AsyncLLM: the asyncio frontend (vLLM's `AsyncLLM`). Two ways to drive the engine, chosen by its client:

- an engine core in this process (the default): the engine loop runs in a background thread beside the event loop
  and steps the core; outputs reach each request's stream through `loop.call_soon_threadsafe`, so the event loop
  never waits for a step;
- an engine core in its own process (`engine_process: true`, the server's default on a GPU): the core steps by
  itself, so no thread is needed here. A task of the event loop reads the core's output messages, detokenizes them
  and feeds the streams directly, and requests are sent from the event loop, as vLLM's AsyncLLM does. This keeps
  the frontend's Python in one thread: no GIL hand-offs between an engine thread and the event loop, which on a
  busy server made each socket write wait for the other thread's time slice.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from weavelm.core import serial
from weavelm.core.llm import LLM
from weavelm.core.llm_engine import EngineStats, LLMEngine, PromptType, engine_stats
from weavelm.core.outputs import CompletionOutput, RequestOutput
from weavelm.core.request import SamplingParams
from weavelm.errors import EngineDeadError, EngineError, RequestError

logger = logging.getLogger("weavelm.async_llm")
OUTPUT_CHUNK = 128  # a reader folds a step's outputs this many at a time, letting the event loop run in between
# When several steps' outputs are already waiting, the reader folds them all before the streams run, so each stream
# writes one event for all its new tokens (as vLLM's output collector merges them): a frontend that falls behind
# the core sends fewer, larger events instead of queueing ever more work.
MAX_BACKLOG = 16


class _Choice:
    """One completion's state inside a stream, folded from the engine's per-step deltas."""

    __slots__ = ("token_ids", "logprobs", "text", "finish_reason", "stop_reason", "sent_tokens", "sent_text")

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.logprobs: list | None = None
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.sent_tokens = 0
        self.sent_text = 0


class RequestStream:
    """The outputs of one request, in the event loop that added it. The engine thread pushes the engine's delta
    outputs (each step's new token ids and logprobs, the text so far), so it never copies a growing output;
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
        self.on_first_output: Callable[[], None] | None = None

    def push(self, item: RequestOutput | BaseException) -> None:
        """Called in the event loop (via call_soon_threadsafe) with one engine delta output (or the error)."""
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
            completions.append(CompletionOutput(index, text, ids, c.finish_reason, c.stop_reason, logprobs))
        self._changed.clear()
        extra = {}
        if self._prompt_logprobs is not None and not (self.delta and self._prompt_logprobs_sent):
            extra["prompt_logprobs"] = self._prompt_logprobs  # deltas carry them once, cumulative outputs always
            self._prompt_logprobs_sent = True
        return RequestOutput(out.request_id, out.prompt, out.prompt_token_ids, completions, out.finished,
                             out.num_cached_tokens, out.error, out.metrics, **extra)


class AsyncLLM:
    """`AsyncLLM(model=..., **overrides)` (the arguments of `LLM`) or `AsyncLLM.from_llm(llm)`.

    `async for out in engine.generate(prompt, params)` streams one request; cancelling the consuming task or
    closing the generator aborts it. An exception escaping the engine loop kills the engine: every waiting and
    later call raises EngineDeadError. Create and use it from one or more event loops; `shutdown()` stops the loop
    thread (from any thread).

    With an engine-core process, the outputs are read by a task of the event loop that first adds a request (or
    asks for stats); streams of other loops get theirs through `call_soon_threadsafe`, and when that loop has
    stopped, the next one to add a request takes the reading over. While it reads, the wrapped `LLM` cannot be
    stepped directly (`LLM.generate` raises EngineError) until `shutdown()`."""

    def __init__(self, model: str | None = None, **kwargs: Any):
        self._init(LLM(model, **kwargs), owns_llm=True)

    @classmethod
    def from_llm(cls, llm: LLM) -> AsyncLLM:
        self = cls.__new__(cls)
        self._init(llm, owns_llm=False)
        return self

    def _init(self, llm: LLM, owns_llm: bool) -> None:
        self.llm = llm
        self.engine: LLMEngine = llm.engine
        self._owns_llm = owns_llm
        self._commands: list[Callable[[], None]] = []
        self._commands_lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._open: dict[str, RequestStream] = {}  # event-loop side: unfinished requests by id
        self._num_waiting = 0
        self.output_observer: Callable[[RequestStream, RequestOutput, int, float | None, float], None] | None = None
        self._dead: EngineDeadError | None = None
        self._stopping = False
        # an engine-core process: outputs are read by a task of an event loop (see the class docstring)
        self._reader_mode = callable(getattr(self.engine.client, "recv_async", None))
        self._reader: asyncio.Task | None = None
        self._reader_loop: asyncio.AbstractEventLoop | None = None
        self._flush_pending = False
        self._thread: threading.Thread | None = None
        if not self._reader_mode:
            self._thread = threading.Thread(target=self._run, name="weavelm-engine-loop", daemon=True)
            self._thread.start()

    # -- public API -----------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

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
        """Requests added and not yet given any output: queued for the loop thread or waiting in the scheduler."""
        return self._num_waiting

    def check_health(self) -> None:
        """Raise EngineDeadError when the engine loop (or the engine-core process) has died."""
        if self._dead is None and self._reader_mode and not self._stopping:
            try:
                self.engine.client.check_alive()
            except EngineDeadError as e:
                self._die(e)
        if self._dead is not None:
            raise self._dead

    async def add_request(self, prompt: PromptType, params: SamplingParams | None = None,
                          request_id: str | None = None, *, delta: bool = False,
                          lora_request: Any = None) -> RequestStream:
        """Validate (RequestError), queue on `lora_request` (None: the base model), and wait until the engine
        accepted the request; returns its stream.
        The caller must iterate it to the end or call `abort`."""
        self.check_health()
        prepared = self.engine.prepare(prompt, params)  # tokenizer and validation: the engine's own
        rid = request_id if request_id is not None else f"req-{uuid.uuid4().hex}"
        if not isinstance(rid, str):
            raise RequestError(f"request_id: must be a str (got {type(rid).__name__})")
        if rid in self._open:
            raise RequestError(f"request_id: {rid!r} is already in use")
        stream = RequestStream(rid, asyncio.get_running_loop(), delta)
        stream.observer = self.output_observer
        self._num_waiting += 1

        def left_waiting() -> None:
            self._num_waiting -= 1

        stream.on_first_output = left_waiting
        self._open[rid] = stream
        if self._reader_mode:
            return self._submit_here(prepared, stream, lora_request)
        try:
            self._post(lambda: self._submit(prepared, stream, lora_request),
                       on_dead=lambda e: self._fail_accept(stream, e))
            await stream.accepted
        except BaseException:
            rejected = stream.accepted.done() and not stream.accepted.cancelled() and \
                stream.accepted.exception() is not None
            self._forget(stream, abort=not rejected)  # cancelled while queued: the submit may still come
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
                self._forget(stream, abort=False)
        if ids and self._dead is None:
            if self._reader_mode:
                self._route(self.engine.abort_request(ids))
            else:
                self._post(lambda: self._route(self.engine.abort_request(ids)))

    async def abort(self, request_ids: str | Sequence[str]) -> None:
        self.abort_nowait(request_ids)

    async def get_stats(self) -> EngineStats:
        """The engine's stats, taken by the loop thread between steps (pending aborts applied)."""
        if self._reader_mode:
            self.check_health()
            self._ensure_reader()
            return engine_stats(await self.engine.client.call_async("get_stats", ()))
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def stats() -> None:
            result = self.engine.get_stats()
            loop.call_soon_threadsafe(_set_result, fut, result)

        self._post(stats, on_dead=lambda e: loop.call_soon_threadsafe(_set_exception, fut, e))
        return await fut

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort every request, stop the loop thread and shut the engine down. Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        if self._reader_mode:
            self._stop_reader()
        elif self._dead is None:
            self._post(lambda: self._route(self.engine.abort_request(list(self._streams))))
        self._wake.set()
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        if self._owns_llm:
            try:
                self.llm.shutdown()
            except Exception:  # a dead engine may fail to shut down cleanly; nothing is left to save
                logger.exception("engine shutdown failed")

    # -- event-loop side helpers ------------------------------------------------------------------------------
    def _forget(self, stream: RequestStream, abort: bool) -> None:
        if self._open.get(stream.request_id) is stream:
            del self._open[stream.request_id]
            if stream.on_first_output is not None:  # never got an output: still counted as waiting
                stream.on_first_output()
                stream.on_first_output = None
        if abort and self._dead is None:
            rid = stream.request_id
            if self._reader_mode:  # its stream still gets the final "abort" output (for the metrics)
                self._route(self.engine.abort_request([rid]))
            else:
                self._post(lambda: self._route(self.engine.abort_request([rid])))

    def _post(self, command: Callable[[], None], on_dead: Callable[[EngineDeadError], None] | None = None) -> None:
        with self._commands_lock:
            dead = self._dead
            if dead is None:
                self._commands.append(command)
        if dead is not None:
            if on_dead is not None:
                on_dead(dead)
            return
        if on_dead is not None:
            command.on_dead = on_dead  # type: ignore[attr-defined]
        self._wake.set()

    def _fail_accept(self, stream: RequestStream, error: BaseException) -> None:
        stream.loop.call_soon_threadsafe(_set_exception, stream.accepted, error)

    # -- an engine-core process: the reader task ------------------------------------------------------------
    def _submit_here(self, prepared: tuple, stream: RequestStream, lora_request: Any) -> RequestStream:
        """Queue a request on the core from the event loop (sent at the end of this loop iteration, together with
        the other requests added in it)."""
        self._ensure_reader()
        rid = stream.request_id
        self._streams[rid] = stream  # before the add: a reader in another loop may see its outputs at once
        try:
            self.engine.submit(prepared, rid, lora_request=lora_request)
        except BaseException:
            self._streams.pop(rid, None)
            self._forget(stream, abort=False)
            raise
        stream.accepted.set_result(None)
        if asyncio.get_running_loop() is self._reader_loop:
            if not self._flush_pending:
                self._flush_pending = True
                self._reader_loop.call_soon(self._flush)
        else:
            self._flush()
        return stream

    def _flush(self) -> None:
        self._flush_pending = False
        try:
            self.engine.client.flush()
        except EngineDeadError:
            pass  # the reader reports it to every stream

    def _ensure_reader(self) -> None:
        """Start the reader task in the running loop unless one is reading in a loop that still runs."""
        reader, loop = self._reader, asyncio.get_running_loop()
        if reader is not None and not reader.done() and self._reader_loop is not None and \
                (self._reader_loop is loop or self._reader_loop.is_running()):
            return
        self.engine.client.attach_async()
        self._reader_loop, self._flush_pending = loop, False
        self._reader = loop.create_task(self._read(), name="weavelm-output-reader")

    async def _read(self) -> None:
        """Read the core's messages until cancelled: fold each batch of outputs into RequestOutputs (detokenized,
        stop strings applied) and push them to their streams; hand utility results to their callers."""
        client, engine = self.engine.client, self.engine
        try:
            while True:
                messages = [await client.recv_async()]
                while len(messages) < MAX_BACKLOG:  # what else is waiting: this loop is behind the core
                    message = client.recv_nowait()
                    if message is None:
                        break
                    messages.append(message)
                behind = len(messages) > 1
                for kind, payload in messages:
                    if kind == serial.OUTPUTS:
                        for i in range(0, len(payload), OUTPUT_CHUNK):
                            if i and not behind:
                                await asyncio.sleep(0)  # let the loop write what is ready
                            self._route(engine.process_outputs(client.took(payload[i:i + OUTPUT_CHUNK])))
                    elif kind == serial.UTILITY_RESULT:
                        client.file_result(payload)
                    else:
                        raise EngineError(f"unexpected message kind {kind} from the engine core")
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the core died, or the frontend's own processing failed: the engine is lost
            if not self._stopping:
                self._die(e)

    def _stop_reader(self) -> None:
        """shutdown(): abort what is left, stop the reader and give the reading back to the LLM."""
        client = self.engine.client
        if self._dead is None and self._streams:
            try:
                self.engine.abort_request(list(self._streams))
                client.flush()
            except EngineError:
                pass
        reader, loop = self._reader, self._reader_loop
        if reader is not None and not reader.done() and loop is not None and not loop.is_closed():
            try:
                if _running_loop() is loop:
                    reader.cancel()
                else:
                    loop.call_soon_threadsafe(reader.cancel)
            except RuntimeError:  # closed meanwhile
                pass
        client.detach_async()

    # -- the loop thread ------------------------------------------------------------------------------------
    def _submit(self, prepared: tuple, stream: RequestStream, lora_request: Any = None) -> None:
        try:
            self.engine.submit(prepared, stream.request_id, lora_request=lora_request)
        except RequestError as e:
            self._fail_accept(stream, e)
            return
        self._streams[stream.request_id] = stream
        stream.loop.call_soon_threadsafe(_set_result, stream.accepted, None)

    def _run(self) -> None:
        try:
            while True:
                with self._commands_lock:
                    commands, self._commands = self._commands, []
                for command in commands:
                    command()
                busy = self.engine.has_unfinished_requests()
                if self._stopping and not busy:
                    return
                if not busy:
                    self._wake.wait()
                    self._wake.clear()
                    continue
                self._route(self.engine.step(delta=True))  # deltas: no per-step copies of outputs
        except BaseException as e:  # the engine is broken: fail every caller, now and later
            self._die(e)

    def _route(self, outputs: list[RequestOutput]) -> None:
        """Each output to its stream: at once for streams of the reader's own loop, else through their loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        here = self._reader_loop if self._reader_mode else None
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            if stream.loop is here:
                stream.push(out)
            else:
                by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop was closed: nobody listens to these requests any more
                self.engine.abort_request([s.request_id for s, _ in items])

    def _die(self, error: BaseException) -> None:
        detail = "".join(traceback.format_exception(error)).rstrip()
        logger.error("the engine loop died:\n%s", detail)
        dead = error if isinstance(error, EngineDeadError) else EngineDeadError(
            f"the engine loop died: {type(error).__name__}: {error}")
        if not isinstance(error, EngineError):
            dead.__cause__ = error
        with self._commands_lock:
            self._dead = dead
            commands, self._commands = self._commands, []
        if self._reader_mode:
            self.engine.client.fail_waiters(dead)
        for command in commands:
            on_dead = getattr(command, "on_dead", None)
            if on_dead is not None:
                on_dead(dead)
        streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            try:
                stream.loop.call_soon_threadsafe(stream.push, dead)
            except RuntimeError:
                pass


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _deliver(items: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, out in items:
        stream.push(out)


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, error: BaseException) -> None:
    if not fut.done():
        fut.set_exception(error)
