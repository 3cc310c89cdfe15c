"""`weavelm serve --api-server-count N` (vLLM's flag): N API-server processes in front of one engine core.

One API-server process turns every output token into an SSE event in Python: under a few hundred concurrent
streams its one core (the GIL) is the limit, not the device. With N of them the frontend work splits N ways:

- this process (the supervisor) starts the engine-core process, binds the listening socket and starts N API-server
  processes that share it (the kernel hands each new connection to one of them);
- API server `k` joins the core as frontend `k` (`CoreAttachment`): it tokenizes and validates its own requests,
  reads the outputs of those requests only, and detokenizes and streams them;
- `/metrics` sums the counters and histograms of every API server (prometheus_client's multiprocess mode, in a
  private directory); the engine gauges are the core's, taken by whichever server is scraped;
- `--max-waiting-requests` applies per API server;
- SIGTERM or SIGINT here closes the listening socket, asks each API server to shut down gracefully (each lets its
  requests finish up to `--shutdown-timeout`, then aborts the rest), then stops the core. An API server or the
  core that dies takes the others down, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Any

from weavelm.core.core_process import stop_process
from weavelm.errors import WeaveError

logger = logging.getLogger("weavelm.serve")
CORE_STOP_WAIT_S = 15.0  # after SIGTERM, how long the core gets to shut its executor down before SIGKILL
STARTUP_REPORT_WAIT_S = 10.0  # a core that exited (not killed): how long the API servers get to report why


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket the API servers share (uvicorn's own bind: SO_REUSEADDR, inheritable)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise WeaveError(f"--host/--port: cannot bind {host}:{port} ({e.strerror or e})") from e
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve_multi(args: argparse.Namespace, config: Any) -> int:
    """Run the supervisor until SIGTERM/SIGINT or a child's death; returns the exit status."""
    from weavelm.core.engine_proc import run_engine_core
    from weavelm.core.core_process import CoreAttachment
    from weavelm.core.registry import Registry

    n = args.api_server_count
    config.engine_process = True
    tmpdir = tempfile.mkdtemp(prefix="weavelm-serve-")
    inputs = [f"ipc://{tmpdir}/input-{k}" for k in range(n)]
    outputs = [f"ipc://{tmpdir}/output-{k}" for k in range(n)]
    metrics_dir = os.path.join(tmpdir, "metrics")
    os.makedirs(metrics_dir)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # inherited by the API servers, read at their import
    stop = threading.Event()
    ctx = multiprocessing.get_context("spawn")
    sock = bind_socket(args.host, args.port)
    core = ctx.Process(target=run_engine_core, name="EngineCore",
                       args=(config, Registry.load().spec, inputs, outputs, os.getpid()))
    servers: list[Any] = []

    def on_signal(signum: int, frame: Any) -> None:
        """Stop accepting at once: close our copy of the socket and start each API server's graceful shutdown
        (each closes its own copy); the main loop then waits for them and stops the core."""
        stop.set()
        sock.close()
        _stop_servers(servers, None)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        core.start()
        for k in range(n):
            if stop.is_set():  # a signal during startup: start nothing more
                break
            proc = ctx.Process(target=run_api_server, name=f"APIServer-{k}",
                               args=(args, config, k, sock, CoreAttachment(inputs[k], outputs[k], core.pid),
                                     os.getpid()))
            proc.start()
            servers.append(proc)
        print(f"weavelm serve: {n} API servers (pids {', '.join(str(p.pid) for p in servers)}) and the engine "
              f"core (pid {core.pid}) on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
        while not stop.is_set():
            multiprocessing.connection.wait([core.sentinel] + [p.sentinel for p in servers], timeout=0.2)
            dead = [p for p in [core, *servers] if not p.is_alive()]
            if dead and not stop.is_set():
                if core.exitcode is not None and core.exitcode >= 0:  # it exited: a startup error, reported to
                    deadline = time.monotonic() + STARTUP_REPORT_WAIT_S  # each API server, which exits 2 with it
                    for proc in servers:
                        proc.join(max(0.0, deadline - time.monotonic()))
                names = ", ".join(f"{p.name} (pid {p.pid}, exit code {p.exitcode})" for p in dead)
                print(f"error: {names} stopped; shutting the server down", file=sys.stderr, flush=True)
                code = 2 if any(p.exitcode == 2 for p in servers) else 1
                break
    finally:
        sock.close()  # no new connections from here on
        _stop_servers(servers, args.shutdown_timeout + 15.0)
        failed = [p for p in servers if p.exitcode not in (0, None)]
        if failed:
            print("error: " + ", ".join(f"{p.name} (pid {p.pid}) exited with {p.exitcode}" for p in failed),
                  file=sys.stderr, flush=True)
            code = code or 1
        _stop_core(core)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(tmpdir, ignore_errors=True)
    return code


def _stop_servers(servers: list[Any], timeout: float | None) -> None:
    """SIGTERM each API server once (uvicorn's graceful shutdown); with a `timeout`, wait for them, then kill."""
    for proc in servers:
        if proc.is_alive() and not getattr(proc, "sigterm_sent", False):
            proc.sigterm_sent = True
            proc.terminate()
    if timeout is None:
        return
    for proc in servers:
        proc.join(timeout)
        if proc.is_alive():
            logger.error("API server pid %d did not stop in %.0f s; killing it", proc.pid, timeout)
            proc.kill()
            proc.join()


def _stop_core(core: Any) -> None:
    """SIGTERM: the core shuts its executor (and its worker processes) down and exits 0; SIGKILL if it hangs."""
    if core.pid is not None:
        stop_process(core, CORE_STOP_WAIT_S)


def run_api_server(args: argparse.Namespace, config: Any, index: int, sock: socket.socket, attachment: Any,
                   parent_pid: int) -> None:
    """API-server process `index`: an AsyncLLM joined to the shared core, the app, uvicorn on the shared socket."""
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor turns Ctrl-C into SIGTERM for us
    stop_early = threading.Event()  # a SIGTERM before uvicorn took the signals over: start, then stop at once
    signal.signal(signal.SIGTERM, lambda *_: stop_early.set())
    try:
        from weavelm.core.async_llm import AsyncLLM
        from weavelm.serve.cli import run_uvicorn

        engine = AsyncLLM(config=config, core_attachment=attachment)
    except WeaveError as e:
        print(f"error: API server {index}: {e}", file=sys.stderr, flush=True)
        sys.exit(2)  # a configuration the engine refused, as `weavelm` exits on any WeaveError
    _watch_parent(parent_pid)
    try:
        if not stop_early.is_set():
            run_uvicorn(args, engine, sockets=[sock], metrics_dir=os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
                        stop_early=stop_early)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # uvicorn restored the default: finish the cleanup
        engine.shutdown()
    sys.exit(0)


def _watch_parent(parent_pid: int) -> None:
    """Shut this API server down (SIGTERM to itself) when the supervisor is gone."""
    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            threading.Event().wait(1.0)

    threading.Thread(target=watch, name="weavelm-parent-watch", daemon=True).start()
