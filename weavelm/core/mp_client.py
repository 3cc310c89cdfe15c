"""The clients of an engine core in its own process (`engine_process: true`): `SyncMPClient` for blocking callers,
`AsyncMPClient` for asyncio, both over one `CoreProcess` (core/core_process.py: spawn, sockets, liveness).

New requests are queued and sent in one ADD message before the next message of any other kind (or, in asyncio, at
the end of the loop iteration that added them). Utility calls (`get_stats`, `collective_rpc`) carry a call id; the
core answers with UTILITY_RESULT, which the reader files for its caller while outputs keep arriving.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from typing import Any

from weavelm.core import serial
from weavelm.core.client import EngineCoreClient
from weavelm.core.config import EngineConfig
from weavelm.core.core_process import POLL_MS, CoreAttachment, CoreProcess
from weavelm.core.outputs import EngineCoreOutput, SchedulerStats
from weavelm.core.registry import Registry
from weavelm.core.request import Request
from weavelm.errors import EngineDeadError, EngineError


class _MPClient(EngineCoreClient):
    """What both clients share: the process, the queued adds, the unfinished set, utility call ids."""

    def __init__(self, config: EngineConfig, registry: Registry, attachment: CoreAttachment | None = None):
        self.core = CoreProcess(config, registry, attachment)
        self.core_pid = self.core.pid
        self.model_info: dict[str, Any] = self.core.ready["model_info"]
        self.max_model_len: int = self.core.ready["max_model_len"]
        self._adds: list[tuple] = []
        self._unfinished: set[str] = set()  # added here, final output not yet read
        self._call_ids = itertools.count()

    def _queue_add(self, request: Request) -> None:
        self.core.check_alive()
        self._unfinished.add(request.request_id)
        self._adds.append(serial.request_to_wire(request))

    def _flush(self) -> None:
        if self._adds:
            adds, self._adds = self._adds, []
            self.core.send(serial.ADD, adds)

    def abort_requests(self, request_ids: list[str]) -> None:
        """A no-op once the core is dead (there is nothing left to abort); aborts run in cleanups."""
        if self.core.dead is None and request_ids:
            try:
                self._flush()
                self.core.send(serial.ABORT, list(request_ids))
            except EngineDeadError:
                pass

    def _took(self, batch: list[EngineCoreOutput]) -> list[EngineCoreOutput]:
        for out in batch:
            if out.finished:
                self._unfinished.discard(out.request_id)
        return batch

    def _unwrap(self, method: str, ok: bool, value: Any) -> Any:
        if ok:
            return value
        message, text, exc = value
        if exc is not None:
            exc.add_note(f"(raised in the engine core process, pid {self.core.pid})\n{text}")
            raise exc
        raise EngineError(f"{method} failed in the engine core: {message}\n{text}")

    def check_health(self) -> None:
        self.core.check_alive()
        self.core.check_liveness(waiting=False)

    def shutdown(self) -> None:
        self.core.shutdown()


class SyncMPClient(_MPClient):
    """For `LLMEngine`, which calls it from one thread at a time."""

    def __init__(self, config: EngineConfig, registry: Registry, attachment: CoreAttachment | None = None):
        super().__init__(config, registry, attachment)
        self._batches: deque[list[EngineCoreOutput]] = deque()
        self._results: dict[int, tuple[bool, Any]] = {}

    def add_request(self, request: Request) -> None:
        """Queued, sent with the next message; a request the core refuses comes back as an error output."""
        self._queue_add(request)

    def get_output(self) -> list[EngineCoreOutput]:
        self._flush()
        while not self._batches:
            if not self._unfinished:
                return []
            self._read()
        return self._took(self._batches.popleft())

    def has_unfinished_requests(self) -> bool:
        return bool(self._unfinished or self._batches)

    def get_stats(self) -> SchedulerStats:
        return self._call("get_stats", ())

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None,
                       ranks: list[int] | None = None) -> list[Any]:
        """`args`, `kwargs` and the results must pickle."""
        return self._call("collective_rpc", (method, args, kwargs, ranks))

    def call_utility(self, method: str, *args: Any) -> Any:
        return self._call(method, args)

    def _call(self, method: str, args: tuple) -> Any:
        self._flush()
        call_id = next(self._call_ids)
        self.core.send(serial.UTILITY, (call_id, method, args))
        while call_id not in self._results:
            self._read()
        return self._unwrap(method, *self._results.pop(call_id))

    def _read(self) -> None:
        message = self.core.recv(waiting=True)
        if message is None:
            return
        kind, payload = message
        if kind == serial.OUTPUTS:
            self._batches.append(payload)
        elif kind == serial.UTILITY_RESULT:
            call_id, ok, value = payload
            self._results[call_id] = (ok, value)
        else:
            raise AssertionError(f"unexpected message kind {kind} from the engine core")


class AsyncMPClient(_MPClient):
    """For `AsyncLLM`: one reader task of the event loop reads the core's messages, queues output batches for
    `get_output_async` and settles utility calls' futures."""

    def __init__(self, config: EngineConfig, registry: Registry, attachment: CoreAttachment | None = None):
        super().__init__(config, registry, attachment)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._reader: asyncio.Task | None = None
        self._waiters: dict[int, asyncio.Future] = {}
        self._flush_scheduled = False

    async def add_request_async(self, request: Request) -> None:
        self._bind()
        self._queue_add(request)
        if not self._flush_scheduled:  # one ADD message for every request added in this loop iteration
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_soon)

    async def get_output_async(self) -> list[EngineCoreOutput]:
        self._bind()
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)  # for every later caller too
            raise item
        return item

    async def call_utility_async(self, method: str, *args: Any) -> Any:
        self._bind()
        self._flush()
        call_id = next(self._call_ids)
        future = self._loop.create_future()
        self._waiters[call_id] = future
        try:
            self.core.send(serial.UTILITY, (call_id, method, args))
            return self._unwrap(method, *await future)
        finally:
            self._waiters.pop(call_id, None)

    def _flush_soon(self) -> None:
        self._flush_scheduled = False
        try:
            self._flush()
        except EngineDeadError:
            pass  # the reader reports it

    def _bind(self) -> None:
        """Read in the running loop: start the reader there unless it runs already (the previous loop ended)."""
        loop = asyncio.get_running_loop()
        if loop is self._loop and self._reader is not None and not self._reader.done():
            return
        if self._loop is not None and self._loop is not loop and self._loop.is_running():
            raise EngineError("this engine is driven from another running event loop; use one loop per engine")
        self.core.check_alive()
        queue: asyncio.Queue = asyncio.Queue()
        while self._queue is not None and not self._queue.empty():
            queue.put_nowait(self._queue.get_nowait())  # batches the previous loop never took
        self._loop, self._queue, self._flush_scheduled = loop, queue, False
        self._reader = loop.create_task(self._read(), name="weavelm-core-reader")

    async def _read(self) -> None:
        import zmq
        import zmq.asyncio

        core = self.core
        socket = zmq.asyncio.Socket.shadow(core.output.underlying)
        try:
            while True:
                if not await socket.poll(POLL_MS, zmq.POLLIN):
                    core.check_liveness(waiting=bool(self._unfinished or self._waiters))
                    continue
                while True:
                    try:
                        data = core.output.recv(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._file(*core.decode(data.buffer))
        except EngineDeadError as e:
            self._queue.put_nowait(e)
            for future in self._waiters.values():
                if not future.done():
                    future.set_exception(e)

    def _file(self, kind: int, payload: Any) -> None:
        if kind == serial.OUTPUTS:
            self._queue.put_nowait(self._took(payload))
        elif kind == serial.UTILITY_RESULT:
            call_id, ok, value = payload
            future = self._waiters.get(call_id)
            if future is not None and not future.done():
                future.set_result((ok, value))
        else:
            raise AssertionError(f"unexpected message kind {kind} from the engine core")

    def shutdown(self) -> None:
        reader = self._reader
        if reader is not None and not reader.done() and self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(reader.cancel)
            except RuntimeError:
                pass
        super().shutdown()
