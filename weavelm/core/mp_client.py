"""MPClient: the engine core in its own process (`engine_process: true`), reached over ZeroMQ.

Two PUSH/PULL pipes over `ipc://` sockets in a private temp dir: frontend -> core (adds, aborts, utility calls,
shutdown) and core -> frontend (outputs, utility results, the core's death report); the wire format is
`core/serial.py`. The core process is owned: its death is noticed within `POLL_MS` by whoever waits on it and
turns into `EngineDeadError` for that caller and every later one; `shutdown()`, garbage collection and interpreter
exit (an atexit hook that runs before multiprocessing joins its children) all stop it, escalating from a SHUTDOWN
message to SIGTERM to SIGKILL.

Two ways to read the core's messages: blocking (`get_output`, what `LLMEngine.step` and `LLM.generate` use), or,
once `attach_async()` was called, from an asyncio task that awaits `recv_async()` (what `AsyncLLM` does, so the
server's outputs are handled in its event loop with no second thread). While attached, blocking reads raise and
utility calls from other threads wait for the event loop to file their results.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import itertools
import multiprocessing
import multiprocessing.util  # noqa: F401 - imported before our atexit hook, so ours runs before its join
import os
import shutil
import signal
import tempfile
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any

from weavelm.core import serial
from weavelm.core.client import EngineCoreClient
from weavelm.core.config import EngineConfig
from weavelm.core.engine_proc import run_engine_core
from weavelm.core.outputs import EngineCoreOutput, SchedulerStats
from weavelm.core.registry import Registry
from weavelm.core.request import Request
from weavelm.errors import EngineDeadError, EngineError

PROCESS_NAME = "engine core"
POLL_MS = 100  # how often a waiting caller checks that the core process is alive
REPORT_WAIT_MS = 500  # after the core is found dead, how long to wait for its death report
SHUTDOWN_WAIT_S = 5.0  # per escalation step: SHUTDOWN message, then SIGTERM, then SIGKILL
_FINALIZERS: set[weakref.finalize] = set()


class MPClient(EngineCoreClient):
    """Drives an `EngineCoreProc` in a spawned process. Thread-safe: adds and aborts may come from any thread;
    one thread at a time reads the core's messages and files each where its reader will find it."""

    thread_safe = True

    def __init__(self, config: EngineConfig, registry: Registry, attachment: CoreAttachment | None = None):
        import zmq

        self._zmq = zmq
        self.serializer = serial.SERIALIZER()
        if attachment is None:
            tmpdir = tempfile.mkdtemp(prefix="weavelm-core-")
            input_addr, output_addr = f"ipc://{tmpdir}/input", f"ipc://{tmpdir}/output"
        else:
            tmpdir, input_addr, output_addr = None, attachment.input_addr, attachment.output_addr
        ctx = zmq.Context()
        self._input = ctx.socket(zmq.PUSH)
        self._output = ctx.socket(zmq.PULL)
        for sock, addr in ((self._input, input_addr), (self._output, output_addr)):
            sock.setsockopt(zmq.SNDHWM, 0)  # never block a sender: both sides send while the other is busy
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.bind(addr)
        if attachment is None:
            self.proc: Any = multiprocessing.get_context("spawn").Process(
                target=run_engine_core, args=(config, registry.spec, input_addr, output_addr, os.getpid()),
                name="EngineCore", daemon=False)  # not daemonic: the core may start worker processes of its own
            self.proc.start()
            self._finalizer = weakref.finalize(self, _stop_core, self.proc, ctx, self._input, self._output, tmpdir,
                                               self.serializer.encode(serial.SHUTDOWN, None))
        else:  # a core shared with other frontends: its owner stops it; leaving only closes our sockets
            self.proc = SharedCoreProcess(attachment.core_pid)
            self._finalizer = weakref.finalize(self, _close_sockets, ctx, self._input, self._output)
        _FINALIZERS.add(self._finalizer)
        self._send_lock = threading.Lock()
        self._recv_lock = threading.RLock()
        self._dead: EngineDeadError | None = None
        self._adds: list[tuple] = []  # new requests, sent in one message before the next anything-else
        self._unfinished: set[str] = set()
        self._batches: deque[list[EngineCoreOutput]] = deque()
        self._results: dict[int, tuple[bool, Any]] = {}
        self._call_ids = itertools.count()
        # attach_async(): the event loop that reads the core's messages, and the callers waiting for results
        self._reader_loop: asyncio.AbstractEventLoop | None = None
        self._reader_thread: int | None = None
        self._waiters: dict[int, asyncio.Future | concurrent.futures.Future] = {}
        self._async_output: Any = None  # zmq.asyncio shadow of the output socket
        info = self._wait_ready()
        self.model_info: dict[str, Any] = info["model_info"]
        self.max_model_len: int = info["max_model_len"]
        self.num_blocks: int = info["num_blocks"]

    # -- EngineCoreClient ---------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request for the core; it is sent with the next message. A request the core can never run
        comes back from `get_output` as a finished output with `error` set."""
        self._check_alive()
        self._unfinished.add(request.request_id)
        self._adds.append(serial.request_to_wire(request))

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        """Send an abort and return []: the aborted requests' final outputs come from `get_output`. A no-op once
        the core is dead (there is nothing left to abort)."""
        if self._dead is None and request_ids:
            try:
                self._send(serial.ABORT, list(request_ids))
            except EngineDeadError:  # found dead just now: recorded for the next call; aborts run in cleanups
                pass
        return []

    def get_output(self) -> list[EngineCoreOutput]:
        """The next batch of outputs the core sent: blocks until one arrives (raising EngineDeadError if the core
        dies meanwhile); [] at once when no request is unfinished."""
        self._send(None, None)
        if self._reading_in_a_loop():
            raise EngineError("the engine core's outputs are read by an AsyncLLM in an event loop; this LLM cannot "
                              "be stepped directly while it is attached (shut the AsyncLLM down first)")
        with self._recv_lock:
            while not self._batches:
                if not self._unfinished:
                    return []
                self._file(*self._next_message())
            batch = self._batches.popleft()
        return self.took(batch)

    def took(self, batch: list[EngineCoreOutput]) -> list[EngineCoreOutput]:
        """Record a batch of outputs as handed to the frontend (its finished requests are no longer
        unfinished); returns it."""
        for out in batch:
            if out.finished:
                self._unfinished.discard(out.request_id)
        return batch

    def flush(self) -> None:
        """Send the queued adds now."""
        self._send(None, None)

    # -- reading from an event loop -------------------------------------------------------------------------
    def attach_async(self) -> None:
        """Make the running event loop the one reader of the core's messages: its task awaits `recv_async()` and
        hands each UTILITY_RESULT to `file_result()`. Blocking reads raise from now on (until `detach_async`)."""
        import zmq.asyncio

        loop = asyncio.get_running_loop()
        with self._recv_lock:
            if self._reader_loop is not None and self._reader_loop is not loop and self._reader_loop.is_running():
                raise EngineError("the engine core's outputs are already read by another running event loop")
            self._reader_loop, self._reader_thread = loop, threading.get_ident()
            if self._async_output is None:
                self._async_output = zmq.asyncio.Socket.shadow(self._output.underlying)

    def _reading_in_a_loop(self) -> bool:
        """Whether an attached event loop reads the core's messages; a loop that has stopped (asyncio.run
        returned) no longer does, and the reading falls back to blocking callers."""
        loop = self._reader_loop
        if loop is None:
            return False
        if loop.is_running():
            return True
        self.detach_async()
        return False

    def detach_async(self) -> None:
        """Give the reading back to blocking callers (results already filed stay)."""
        with self._recv_lock:
            self._reader_loop = self._reader_thread = None

    async def recv_async(self) -> tuple[int, Any]:
        """The core's next message, awaited in the attached loop (OUTPUTS batches are returned, not queued);
        raises EngineDeadError when the core dies (found within POLL_MS)."""
        zmq = self._zmq
        while True:
            message = self.recv_nowait()
            if message is not None:
                return message
            if not await self._async_output.poll(POLL_MS, zmq.POLLIN) and not self.proc.is_alive():
                self._die(None)

    def recv_nowait(self) -> tuple[int, Any] | None:
        """The core's next message if one is already here, else None (for the attached loop)."""
        zmq = self._zmq
        self._check_alive()
        if self._batches:  # filed by a blocking reader before the loop attached
            return serial.OUTPUTS, self._batches.popleft()
        try:
            data = self._output.recv(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        kind, payload = self.serializer.decode(data.buffer)
        if kind == serial.DEAD:
            self._die(payload)
        return kind, payload

    def file_result(self, payload: tuple[int, bool, Any]) -> None:
        """Hand a UTILITY_RESULT read by the attached loop to the caller waiting for it."""
        call_id, ok, value = payload
        waiter = self._waiters.pop(call_id, None)
        if waiter is None:
            self._results[call_id] = (ok, value)
        else:
            _settle(waiter, "set_result", (ok, value))

    def fail_waiters(self, error: BaseException) -> None:
        """The core died: every caller waiting for a utility result gets `error`."""
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            _settle(waiter, "set_exception", error)

    def check_alive(self) -> None:
        """Raise EngineDeadError if the core process has died (reading its death report), without waiting for a
        message."""
        self._check_alive()
        if not self.proc.is_alive():
            self._die(None)

    async def call_async(self, method: str, args: tuple) -> Any:
        """A utility call from the attached loop: its result arrives through that loop's reader."""
        call_id = next(self._call_ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiters[call_id] = fut
        try:
            self._send(serial.UTILITY, (call_id, method, args))
        except BaseException:
            self._waiters.pop(call_id, None)
            raise
        return self._unwrap(method, *await fut)

    def has_unfinished_requests(self) -> bool:
        """Whether a request added here has not yet had its finished output returned by `get_output`."""
        return bool(self._unfinished or self._batches)

    def get_stats(self) -> SchedulerStats:
        return self._call("get_stats", ())

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None,
                       ranks: list[int] | None = None) -> list[Any]:
        """Run on the core's executor between two steps (the core collects its in-flight step first). `args`,
        `kwargs` and the results must pickle."""
        return self._call("collective_rpc", (method, args, kwargs, ranks))

    def drain(self) -> list[EngineCoreOutput]:
        """Nothing to collect here: the core finishes its in-flight step itself before a utility call."""
        return []

    def shutdown(self) -> None:
        """Stop the core process (idempotent); later calls raise EngineDeadError."""
        if self._dead is None:
            self._dead = EngineDeadError(f"the {PROCESS_NAME} process (pid {self.proc.pid}) was shut down")
        self._finalizer()
        self.fail_waiters(self._dead)
        _FINALIZERS.discard(self._finalizer)

    # -- messages -----------------------------------------------------------------------------------------
    def _send(self, kind: int | None, payload: Any) -> None:
        """Send the queued adds, then (unless `kind` is None) one message."""
        with self._send_lock:
            self._check_alive()
            if self._adds:
                adds, self._adds = self._adds, []
                self._send_bytes(self.serializer.encode(serial.ADD, adds))
            if kind is not None:
                self._send_bytes(self.serializer.encode(kind, payload))

    def _send_bytes(self, data: bytes) -> None:
        zmq = self._zmq
        while True:
            try:
                self._input.send(data, flags=zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:  # no peer: the core is gone (or not connected yet)
                if not self.proc.is_alive():
                    self._die(None)
                self._input.poll(POLL_MS, zmq.POLLOUT)

    def _call(self, method: str, args: tuple) -> Any:
        call_id = next(self._call_ids)
        if self._reading_in_a_loop():  # the event loop reads; wait for it to file the result
            if threading.get_ident() == self._reader_thread:
                raise EngineError(f"{method}: a blocking call to the engine core from the event loop that reads "
                                  f"its outputs would wait forever; await the AsyncLLM's method instead")
            waiter: concurrent.futures.Future = concurrent.futures.Future()
            self._waiters[call_id] = waiter
            self._send(serial.UTILITY, (call_id, method, args))
            while True:
                try:
                    ok, value = waiter.result(timeout=POLL_MS / 1000)
                    break
                except concurrent.futures.TimeoutError:
                    self.check_alive()
            return self._unwrap(method, ok, value)
        self._send(serial.UTILITY, (call_id, method, args))
        with self._recv_lock:
            while call_id not in self._results:
                self._file(*self._next_message())
            ok, value = self._results.pop(call_id)
        return self._unwrap(method, ok, value)

    def _unwrap(self, method: str, ok: bool, value: Any) -> Any:
        if ok:
            return value
        message, text, exc = value
        if exc is not None:
            exc.add_note(f"(raised in the engine core process, pid {self.proc.pid})\n{text}")
            raise exc
        raise EngineError(f"{method} failed in the engine core: {message}\n{text}")

    def _file(self, kind: int, payload: Any) -> None:
        if kind == serial.OUTPUTS:
            self._batches.append(payload)
        elif kind == serial.UTILITY_RESULT:
            self.file_result(payload)
        else:
            raise AssertionError(f"unexpected message kind {kind} from the engine core")

    def _next_message(self) -> tuple[int, Any]:
        """The core's next message (a DEAD report raises); checks every POLL_MS that the core is alive."""
        self._check_alive()
        while True:
            if self._output.poll(POLL_MS):
                kind, payload = self.serializer.decode(self._output.recv(copy=False).buffer)
                if kind == serial.DEAD:
                    self._die(payload)
                return kind, payload
            if not self.proc.is_alive():
                self._die(None)

    def _wait_ready(self) -> dict[str, Any]:
        try:
            kind, payload = self._next_message()
        except EngineDeadError as e:
            self._finalizer()
            startup_error = getattr(e, "startup_error", None)
            if startup_error is not None:  # the typed error the core raised (ConfigError, LoadError, ...)
                startup_error.add_note(f"(raised in the engine core process, pid {self.proc.pid})\n{e.traceback}")
                raise startup_error from None
            raise
        assert kind == serial.READY, kind
        return payload

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise self._dead

    def _die(self, report: tuple[str, str, BaseException | None] | None) -> None:
        """Record the core's death (with its report, or one read now if it is still on its way) and raise."""
        if report is None and self._recv_lock.acquire(blocking=False):
            try:
                while self._output.poll(REPORT_WAIT_MS):
                    kind, payload = self.serializer.decode(self._output.recv())
                    if kind == serial.DEAD:
                        report = payload
                        break
                    self._file(kind, payload)
            finally:
                self._recv_lock.release()
        self.proc.join(SHUTDOWN_WAIT_S if report is not None else 0)
        if self._dead is None:
            self._dead = dead_error(self.proc.pid, self.proc.exitcode, report)
        self._finalizer()
        self.fail_waiters(self._dead)
        raise self._dead


@dataclass(frozen=True)
class CoreAttachment:
    """An engine-core process started by someone else (the `weavelm serve --api-server-count N` supervisor) that a
    frontend joins: it binds `input_addr` and `output_addr`, which the core connects to (see `run_engine_core`)."""

    input_addr: str
    output_addr: str
    core_pid: int


class SharedCoreProcess:
    """The `proc` of an MPClient attached to a core it did not start: not its child, so liveness comes from
    /proc (a zombie counts as dead) and the exit code is unknown."""

    exitcode = None

    def __init__(self, pid: int):
        self.pid = pid

    def is_alive(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return False
        except OSError:  # no /proc: ask the kernel
            try:
                os.kill(self.pid, 0)
                return True
            except ProcessLookupError:
                return False

    def join(self, timeout: float | None = None) -> None:
        pass


def dead_error(pid: int | None, exitcode: int | None,
               report: tuple[str, str, BaseException | None] | None) -> EngineDeadError:
    """The error for a dead core process: names it, its pid, exit code or signal, and the traceback it sent.
    Carries `pid`, `exitcode`, `traceback` (text or None) and `startup_error` (the exception, if it pickled)."""
    if exitcode is None:
        how = "died"
    elif exitcode < 0:
        try:
            how = f"was killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
    else:
        how = f"exited with code {exitcode}"
    message = f"the {PROCESS_NAME} process (pid {pid}) {how}"
    if report is not None:
        message += f" after an error: {report[0]}\n{report[1].rstrip()}"
    error = EngineDeadError(message)
    error.pid, error.exitcode = pid, exitcode
    error.traceback = report[1] if report else None
    error.startup_error = report[2] if report else None
    return error


def _stop_core(proc: Any, ctx: Any, input_socket: Any, output_socket: Any, tmpdir: str, shutdown: bytes) -> None:
    """Stop the core process (SHUTDOWN, then SIGTERM, then SIGKILL) and free the sockets and their directory."""
    import zmq

    try:
        if proc.is_alive():
            try:
                input_socket.send(shutdown, flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            proc.join(SHUTDOWN_WAIT_S)
        stop_process(proc, SHUTDOWN_WAIT_S)
    finally:
        _close_sockets(ctx, input_socket, output_socket)
        shutil.rmtree(tmpdir, ignore_errors=True)


def stop_process(proc: Any, wait_s: float) -> None:
    """SIGTERM a child process, give it `wait_s` seconds, then SIGKILL it."""
    if proc.is_alive():
        proc.terminate()
        proc.join(wait_s)
    if proc.is_alive():
        proc.kill()
        proc.join()


def _close_sockets(ctx: Any, input_socket: Any, output_socket: Any) -> None:
    input_socket.close(linger=0)
    output_socket.close(linger=0)
    ctx.term()


def _settle(waiter: asyncio.Future | concurrent.futures.Future, method: str, value: Any) -> None:
    """Complete a waiting caller's future from any thread (an asyncio future in its own loop's thread)."""
    if isinstance(waiter, asyncio.Future):
        loop = waiter.get_loop()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not loop:
            try:
                loop.call_soon_threadsafe(_settle, waiter, method, value)
            except RuntimeError:  # its loop is closed: nobody waits any more
                pass
            return
    if not waiter.done():
        getattr(waiter, method)(value)


@atexit.register
def _stop_all_cores() -> None:
    for finalizer in list(_FINALIZERS):
        finalizer()
    _FINALIZERS.clear()
