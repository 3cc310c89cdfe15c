"""EngineCoreProc: the engine core's busy loop in its own process, fed and drained over ZeroMQ by the multiprocess
clients (core/mp_client.py).

The process is spawned (never forked: the caller may have initialised CUDA) by `core_process.CoreProcess` with
`run_engine_core` as its target. It rebuilds the registry from its picklable spec, builds the `EngineCore`, reports
READY (or DEAD with its startup error) and then loops: apply every queued message (adds, aborts, utility calls),
run one step, send its outputs; it blocks on its input socket only when it holds no unfinished request. Ctrl-C is
left to the parent (SIGINT is ignored here); SIGTERM, a SHUTDOWN message or the parent's death end the loop and
shut the executor down (so its worker processes go too). An exception escaping the loop is sent to the parent as
DEAD with its traceback before the process exits with code 1.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

from weavelm.core import serial
from weavelm.core.config import EngineConfig
from weavelm.core.engine_core import EngineCore
from weavelm.core.outputs import EngineCoreOutput
from weavelm.core.registry import RegistrySpec
from weavelm.errors import RequestError
from weavelm.utils import freeze_gc_heap

logger = logging.getLogger("weavelm.engine_proc")
IDLE_POLL_MS = 1000  # while idle, how often the core checks that its parent is still alive
UTILITY_METHODS = ("get_stats", "collective_rpc", "add_lora", "load_lora_adapter", "remove_lora", "lora_adapters")


def run_engine_core(config: EngineConfig, registry_spec: RegistrySpec, input_addr: str | list[str],
                    output_addr: str | list[str], parent_pid: int,
                    proc_factory: Callable[..., EngineCoreProc] | None = None) -> None:
    """Process entry point. Exits 0 after a SHUTDOWN (or SIGTERM, or its parent's death), 1 after an error.
    `proc_factory` builds the loop (default `EngineCoreProc`; a data-parallel replica's reports its load too).

    Several frontends (API-server processes, `weavelm serve --api-server-count N`) pass lists of addresses:
    frontend `k` sends on `input_addr[k]` and reads `output_addr[k]`; each request's outputs go back to the
    frontend that added it, a utility result to the one that asked, READY and DEAD to all."""
    import zmq

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    input_addrs = [input_addr] if isinstance(input_addr, str) else list(input_addr)
    output_addrs = [output_addr] if isinstance(output_addr, str) else list(output_addr)
    ctx = zmq.Context()
    input_sockets = [ctx.socket(zmq.PULL) for _ in input_addrs]
    output_sockets = [ctx.socket(zmq.PUSH) for _ in output_addrs]
    for sock in input_sockets + output_sockets:
        sock.setsockopt(zmq.LINGER, 5000)  # the last messages (DEAD) still reach the frontends
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
    for sock, addr in zip(input_sockets + output_sockets, input_addrs + output_addrs):
        sock.connect(addr)  # queued until the frontend binds: it may start after the core
    serializer = serial.SERIALIZER()
    core = None
    code = 0
    try:
        from weavelm.core.registry import Registry

        core = EngineCore(config, Registry.from_spec(registry_spec))
        proc = (proc_factory or EngineCoreProc)(core, input_sockets, output_sockets, serializer, parent_pid)
        proc.broadcast(serial.READY, {"model_info": core.model_info, "max_model_len": core.max_model_len,
                                      "num_blocks": core.num_blocks, "pid": os.getpid()})
        freeze_gc_heap()
        proc.run()
    except SystemExit:
        pass
    except BaseException as e:  # noqa: BLE001 - everything that kills the core is reported to the frontends
        code = 1
        report = serializer.encode(serial.DEAD, _death_report(e))
        for sock in output_sockets:
            sock.send(report)
    finally:
        if core is not None:
            try:
                core.shutdown()
            except Exception:  # the executor's own failure must not hide the one being reported
                logger.exception("engine core shutdown failed")
        for sock in input_sockets:
            sock.close(linger=0)
        for sock in output_sockets:
            sock.close()
        ctx.term()
    sys.exit(code)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _death_report(e: BaseException) -> tuple[str, str, BaseException | None]:
    """(message, traceback text, the exception itself when it survives pickling with the same message)."""
    text = "".join(traceback.format_exception(e))
    try:
        same = pickle.loads(pickle.dumps(e, protocol=5))
        kept = e if type(same) is type(e) and str(same) == str(e) else None
    except Exception:
        kept = None
    return f"{type(e).__name__}: {e}", text, kept


class EngineCoreProc:
    """The busy loop around one EngineCore. `run()` returns after a SHUTDOWN message (from any frontend) or when
    the parent is gone. `input_sockets[k]` / `output_sockets[k]` talk to frontend `k` (one socket each for one).
    Each iteration applies every queued message and runs `core.step_fn()` (plain or pipelined, chosen by the core),
    then sends its outputs; it blocks on the sockets only when the core has nothing to do."""

    def __init__(self, core: EngineCore, input_sockets: list[Any], output_sockets: list[Any], serializer: Any,
                 parent_pid: int):
        import zmq

        self.core = core
        self.input_sockets = input_sockets
        self.output_sockets = output_sockets
        self.serializer = serializer
        self.parent_pid = parent_pid
        self.poller = zmq.Poller()
        for sock in self.input_sockets:
            self.poller.register(sock, zmq.POLLIN)
        self.owner: dict[str, int] = {}  # with several frontends: request id -> the frontend that added it
        self.sender = 0  # the frontend whose message is being handled
        self.stopping = False

    def send(self, kind: int, payload: Any, frontend: int = 0) -> None:
        self.output_sockets[frontend].send(self.serializer.encode(kind, payload), copy=False)

    def broadcast(self, kind: int, payload: Any) -> None:
        data = self.serializer.encode(kind, payload)
        for sock in self.output_sockets:
            sock.send(data)

    def run(self) -> None:
        while not self.stopping:
            self._handle_inputs(block=not self.core.has_unfinished_requests())
            if not self.stopping:
                self._send_outputs(self.core.step_fn())

    def _send_outputs(self, outputs: list[EngineCoreOutput]) -> None:
        if not outputs:
            return
        if len(self.output_sockets) == 1:
            self.send(serial.OUTPUTS, outputs)
            return
        owner, batches = self.owner, [[] for _ in self.output_sockets]
        for out in outputs:
            batches[owner.get(out.request_id, 0)].append(out)
            if out.finish_reason is not None:
                owner.pop(out.request_id, None)
        for frontend, batch in enumerate(batches):
            if batch:
                self.send(serial.OUTPUTS, batch, frontend)

    def _handle_inputs(self, block: bool) -> None:
        """Apply every queued message; when `block`, first wait for one (checking on the parent meanwhile)."""
        import zmq

        while True:
            if os.getppid() != self.parent_pid:  # orphaned: the parent died without shutting us down
                logger.error("engine core: parent %d is gone; exiting", self.parent_pid)
                self.stopping = True
                return
            if not block or self.poller.poll(IDLE_POLL_MS):
                break
        for frontend, sock in enumerate(self.input_sockets):
            self.sender = frontend
            while not self.stopping:
                try:
                    data = sock.recv(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._handle(*self.serializer.decode(data.buffer))

    def _handle(self, kind: int, payload: Any) -> None:
        if kind == serial.ADD:
            for row in payload:
                self._add(serial.request_from_wire(row))
        elif kind == serial.ABORT:
            self.core.abort_requests(payload)
        elif kind == serial.UTILITY:
            self._utility(*payload)
        elif kind == serial.SHUTDOWN:
            self.stopping = True
        else:
            raise AssertionError(f"unknown message kind {kind}")

    def _add(self, request: Any) -> None:
        if len(self.output_sockets) > 1:
            self.owner[request.request_id] = self.sender
        try:
            self.core.add_request(request)
        except Exception as e:  # in-process this raises to the caller; here it becomes the request's error output
            if not isinstance(e, RequestError):
                logger.exception("adding request %s failed", request.request_id)
            self._send_outputs([EngineCoreOutput(request.request_id, [], finish_reason="error", error=str(e))])

    def _utility(self, call_id: int, method: str, args: tuple) -> None:
        try:
            if method not in UTILITY_METHODS:
                raise AttributeError(f"the engine core has no utility method {method!r}")
            result = (call_id, True, getattr(self.core, method)(*args))
        except Exception as e:  # the caller gets the exception; the core goes on
            result = (call_id, False, _death_report(e))
        self.send(serial.UTILITY_RESULT, result, self.sender)
