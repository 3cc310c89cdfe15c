"""The engine core's process, as the frontend owns it: spawn (or join), the two ZeroMQ pipes, liveness, death report.

Two PUSH/PULL pipes over `ipc://` sockets in a private temp dir: frontend -> core (adds, aborts, utility calls,
shutdown) and core -> frontend (outputs, utility results, READY, the core's death report); the wire format is
`core/serial.py`, the core's side `core/engine_proc.py`. The clients (`SyncMPClient`, `AsyncMPClient` in
`core/mp_client.py`) read and write through one `CoreProcess`. Its resources live in a finalizer, not in the client:
`shutdown()`, garbage collection and interpreter exit (an atexit hook that runs before multiprocessing joins its
children) all stop the process, escalating from a SHUTDOWN message to SIGTERM to SIGKILL.

Liveness: a dead core is noticed within `POLL_MS` by whoever waits on it; a core that is alive but sends nothing
for `engine_iteration_timeout_s` while the frontend waits on it (frozen: SIGSTOP, a deadlocked worker) is declared
dead too. Either way every waiting and later call gets the same `EngineDeadError`, naming the process.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # noqa: F401 - imported before our atexit hook, so ours runs before its join
import os
import shutil
import signal
import tempfile
import time
import weakref
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

from weavelm.core import serial
from weavelm.core.config import EngineConfig
from weavelm.core.engine_proc import run_engine_core
from weavelm.core.registry import Registry
from weavelm.errors import EngineDeadError

PROCESS_NAME = "engine core"
POLL_MS = 100  # how often a waiting caller checks that the core process is alive
REPORT_WAIT_MS = 500  # after the core is found dead, how long to wait for its death report
SHUTDOWN_WAIT_S = 5.0  # per escalation step: SHUTDOWN message, then SIGTERM, then SIGKILL
_FINALIZERS: set[weakref.finalize] = set()


@dataclass(frozen=True)
class CoreAttachment:
    """An engine-core process started by someone else (the `weavelm serve --api-server-count N` supervisor) that a
    frontend joins: it binds `input_addr` and `output_addr`, which the core connects to (see `run_engine_core`)."""

    input_addr: str
    output_addr: str
    core_pid: int


class CoreProcess:
    """One engine-core process and the frontend's two sockets to it. `send` and `recv` move messages; every
    failure to reach the core ends in `EngineDeadError` (kept in `dead`, raised again by every later call)."""

    def __init__(self, config: EngineConfig, registry: Registry, attachment: CoreAttachment | None = None, *,
                 entry: Callable[..., None] = run_engine_core, entry_kwargs: dict[str, Any] | None = None,
                 wait: bool = True):
        """`entry(config, registry_spec, input_addr, output_addr, parent_pid, **entry_kwargs)` runs in the spawned
        process (a data-parallel replica passes its own, which wraps `run_engine_core`). `wait=False` returns
        once the process is started; `wait_ready()` then waits for its READY (several cores start together)."""
        import zmq

        self.zmq = zmq
        self.serializer = serial.SERIALIZER()
        self.timeout_s = config.engine_iteration_timeout_s
        if attachment is None:
            tmpdir = tempfile.mkdtemp(prefix="weavelm-core-")
            input_addr, output_addr = f"ipc://{tmpdir}/input", f"ipc://{tmpdir}/output"
        else:
            tmpdir, input_addr, output_addr = None, attachment.input_addr, attachment.output_addr
        ctx = zmq.Context()
        self.input = ctx.socket(zmq.PUSH)
        self.output = ctx.socket(zmq.PULL)
        for sock, addr in ((self.input, input_addr), (self.output, output_addr)):
            sock.setsockopt(zmq.SNDHWM, 0)  # never block a sender: both sides send while the other is busy
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.bind(addr)
        if attachment is None:
            self.proc: Any = multiprocessing.get_context("spawn").Process(
                target=entry, args=(config, registry.spec, input_addr, output_addr, os.getpid()),
                kwargs=entry_kwargs or {}, name="EngineCore", daemon=False)  # not daemonic: the core may start worker processes of its own
            self.proc.start()
            self._finalizer = weakref.finalize(self, _stop_core, self.proc, ctx, self.input, self.output, tmpdir,
                                               self.serializer.encode(serial.SHUTDOWN, None))
        else:  # a core shared with other frontends: its owner stops it; leaving only closes our sockets
            self.proc = SharedCoreProcess(attachment.core_pid)
            self._finalizer = weakref.finalize(self, _close_sockets, ctx, self.input, self.output)
        _FINALIZERS.add(self._finalizer)
        self.dead: EngineDeadError | None = None
        self.last_heard = time.monotonic()  # the last message from the core, or the last send that awaits one
        self.ready: dict[str, Any] = {}
        if wait:
            self.wait_ready()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, kind: int, payload: Any) -> None:
        zmq, data = self.zmq, self.serializer.encode(kind, payload)
        self.check_alive()
        while True:
            try:
                self.input.send(data, flags=zmq.NOBLOCK, copy=False)
                break
            except zmq.Again:  # no peer: the core is gone (or not connected yet)
                if not self.proc.is_alive():
                    self.die(None)
                self.input.poll(POLL_MS, zmq.POLLOUT)
        self.last_heard = max(self.last_heard, time.monotonic())

    def recv(self, waiting: bool) -> tuple[int, Any] | None:
        """The core's next message if one arrives within POLL_MS, else None; raises EngineDeadError when the core
        is dead (a DEAD report, or the process gone), or when `waiting` (the frontend expects outputs) and the core
        has been silent past the iteration timeout."""
        self.check_alive()
        if self.output.poll(POLL_MS):
            return self.decode(self.output.recv(copy=False).buffer)
        self.check_liveness(waiting)
        return None

    def decode(self, data: Any) -> tuple[int, Any]:
        kind, payload = self.serializer.decode(data)
        self.last_heard = time.monotonic()
        if kind == serial.DEAD:
            self.die(payload)
        return kind, payload

    def check_liveness(self, waiting: bool) -> None:
        """Raise EngineDeadError if the process is gone, or frozen past the deadline while waited on."""
        if not self.proc.is_alive():
            self.die(None)
        if waiting and self.timeout_s and time.monotonic() - self.last_heard > self.timeout_s:
            self.die(None, f"sent nothing for {self.timeout_s:g} s while requests were waiting "
                           f"(engine_iteration_timeout_s); it is frozen (stopped, or a worker hangs)")

    def check_alive(self) -> None:
        if self.dead is not None:
            raise self.dead

    def die(self, report: tuple[str, str, BaseException | None] | None, how: str | None = None) -> None:
        """Record the core's death (with its report, or one read now if it is still on its way) and raise."""
        if self.dead is None:
            if report is None and how is None:
                while self.output.poll(REPORT_WAIT_MS):
                    kind, payload = self.serializer.decode(self.output.recv())
                    if kind == serial.DEAD:
                        report = payload
                        break
            self.proc.join(SHUTDOWN_WAIT_S if report is not None else 0)
            self.dead = dead_error(self.proc.pid, self.proc.exitcode, report, how)
            self._finalizer()
        raise self.dead

    def shutdown(self) -> None:
        """Stop the core process (idempotent); later calls raise EngineDeadError."""
        if self.dead is None:
            self.dead = EngineDeadError(f"the {PROCESS_NAME} process (pid {self.proc.pid}) was shut down")
        self._finalizer()
        _FINALIZERS.discard(self._finalizer)

    def wait_ready(self) -> dict[str, Any]:
        """Wait for the core's READY (its `model_info`, `max_model_len`, ...) and keep it in `ready`; a core that
        fails to start raises its typed startup error (ConfigError, LoadError, ...) or EngineDeadError."""
        if self.ready:
            return self.ready
        try:
            while (message := self.recv(waiting=False)) is None:
                pass
        except EngineDeadError as e:
            startup_error = getattr(e, "startup_error", None)
            if startup_error is not None:  # the typed error the core raised (ConfigError, LoadError, ...)
                startup_error.add_note(f"(raised in the engine core process, pid {self.proc.pid})\n{e.traceback}")
                raise startup_error from None
            raise
        kind, payload = message
        assert kind == serial.READY, kind
        self.ready = payload
        return payload


class SharedCoreProcess:
    """The `proc` of a frontend attached to a core it did not start: not its child, so liveness comes from
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


def dead_error(pid: int | None, exitcode: int | None, report: tuple[str, str, BaseException | None] | None,
               how: str | None = None) -> EngineDeadError:
    """The error for a dead core process: names it, its pid, exit code or signal (or `how` it failed), and the
    traceback it sent. Carries `pid`, `exitcode`, `traceback` (text or None) and `startup_error` (the exception, if
    it pickled)."""
    if how is None:
        how = "died" if exitcode is None else f"exited with code {exitcode}"
        if exitcode is not None and exitcode < 0:
            name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else -exitcode
            how = f"was killed by signal {name}"
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
    """SIGTERM a child process, give it `wait_s` seconds, then SIGKILL it (a stopped one is continued first, so
    it can act on the SIGTERM)."""
    if proc.is_alive():
        proc.terminate()
        try:
            os.kill(proc.pid, signal.SIGCONT)
        except (ProcessLookupError, TypeError):
            pass
        proc.join(wait_s)
    if proc.is_alive():
        proc.kill()
        proc.join()


def _close_sockets(ctx: Any, input_socket: Any, output_socket: Any) -> None:
    input_socket.close(linger=0)
    output_socket.close(linger=0)
    ctx.term()


@atexit.register
def _stop_all_cores() -> None:
    for finalizer in list(_FINALIZERS):
        finalizer()
    _FINALIZERS.clear()
