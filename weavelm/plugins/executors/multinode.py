"""The multiproc executor across nodes, in vLLM's shape: `--nnodes N --node-rank K --master-addr A --master-port P`,
every node started with the same engine flags, node 0 running the engine (and API server), the others `--headless`
(only their workers).

    # node 0 (address 10.0.0.1): the engine, its local ranks 0 .. L-1, the API server
    weavelm serve --model M --tensor-parallel-size 2 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29600
    # node 1: ranks L .. 2L-1, nothing else
    weavelm serve --model M --tensor-parallel-size 2 --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 \
        --master-port 29600 --headless

Node k runs ranks `k * L .. (k + 1) * L - 1`, `L = world_size / nnodes`. All ranks join one torch.distributed process
group (`tcp://master-addr:<a free port of node 0>`), so the model's collectives span the nodes as they span local
ranks.

How steps reach a remote rank (the choice): each remote worker process connects to node 0's `master-port` (a
`multiprocessing.connection` listener, HMAC-authenticated with `WEAVELM_NODE_AUTHKEY`) and from then on is driven
exactly like a local `WorkerProc` over its pipe: the executor pickles each message once and writes it to every
rank's connection, rank 0 answers the step. So the engine's control messages do not go through the model's process
group (whose collectives stay the model's), and the headless node needs no engine: it receives its worker's
recipe (`build_worker`, world size, init method) from node 0 over the same connection, so every rank runs node 0's
configuration (the headless node's own flags serve the rendezvous; the model path must exist on every node).

Failure: each remote worker holds a second, silent connection to node 0 (its liveness: readable only when it
closes, with TCP keep-alive probing a silent peer every second); a remote worker or node that dies closes it, and
the executor raises an `EngineDeadError` naming the rank, node and host, as for a local rank. A remote worker dies
with its node agent (`PR_SET_PDEATHSIG`) and exits when node 0's connection closes, so neither side leaves orphans.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection as mpc
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from weavelm.errors import ConfigError, EngineError

logger = logging.getLogger("weavelm.executor")
AUTHKEY_ENV = "WEAVELM_NODE_AUTHKEY"
HELLO, ALIVE = "hello", "alive"


class MultiNodeOptions(BaseModel):
    """The rendezvous options (vLLM's names); the multiproc executor's options include them."""

    model_config = ConfigDict(extra="forbid")
    nnodes: int = Field(1, ge=1, le=1024, description="Nodes the ranks are spread over (world size / nnodes each).")
    node_rank: int = Field(0, ge=0, description="This node's index; only node 0 runs the engine, the others "
                           "run `--headless`.")
    master_addr: str = Field("127.0.0.1", description="Node 0's address, reachable from every node.")
    master_port: int = Field(29600, ge=1, le=65535, description="Node 0's port where remote workers connect.")
    node_timeout_s: float = Field(300.0, gt=0, description="How long node 0 waits for every remote worker.")


def _authkey() -> bytes:
    return os.environ.get(AUTHKEY_ENV, "weavelm-nodes").encode()


def local_ranks(options: Any, world_size: int) -> range:
    """The global ranks node `options.node_rank` runs (all of them on one node)."""
    nnodes = getattr(options, "nnodes", 1)
    if world_size % nnodes:
        raise ConfigError([("executor.nnodes", f"{world_size} ranks do not divide evenly over {nnodes} nodes; "
                            f"choose nnodes dividing the world size (tensor x pipeline parallel size)")])
    per_node = world_size // nnodes
    node = getattr(options, "node_rank", 0)
    return range(node * per_node, (node + 1) * per_node)


def init_method(options: Any, world_size: int, free_port: int) -> str | None:
    """The torch.distributed rendezvous: node 0's address and a port free there (None on one rank)."""
    if world_size == 1:
        return None
    host = options.master_addr if getattr(options, "nnodes", 1) > 1 else "127.0.0.1"
    return f"tcp://{host}:{free_port}"


def check_driver(options: Any) -> None:
    """Only node 0 runs an engine."""
    if getattr(options, "node_rank", 0) != 0:
        raise ConfigError([("executor.node_rank", f"node {options.node_rank} runs only its workers: start it with "
                            f"--headless (node 0 runs the engine)")])


def _keepalive(conn: Any) -> None:
    """TCP keep-alive on a connection's socket: a peer gone silent (node lost) errors within a few seconds."""
    s = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, value in (("TCP_KEEPIDLE", 1), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, opt):
                s.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
    finally:
        s.close()


class RemoteWorkerProcess:
    """The executor's view of a worker process on another node (the `multiprocessing.Process` calls the executor
    makes): alive while its liveness connection is open."""

    def __init__(self, rank: int, node: int, host: str, pid: int, alive: Any):
        self.rank, self.node, self.host, self.pid, self.alive = rank, node, host, pid, alive
        self.exitcode: int | None = None

    @property
    def sentinel(self) -> Any:
        return self.alive

    def is_alive(self) -> bool:
        if self.exitcode is None:
            try:
                if self.alive.poll(0):
                    self.exitcode = -1
            except (OSError, EOFError, ValueError):
                self.exitcode = -1
        return self.exitcode is None

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_alive() and (deadline is None or time.monotonic() < deadline):
            mpc.wait([self.alive], timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))

    def kill(self) -> None:  # cannot signal another node: closing its connections ends it
        try:
            self.alive.close()
        except OSError:
            pass
        self.exitcode = self.exitcode if self.exitcode is not None else -1

    def describe(self) -> str:
        return f"worker rank {self.rank} on node {self.node} ({self.host}, pid {self.pid})"


def join_remote_workers(options: Any, world_size: int, build_worker: Any, distributed_init_method: str | None,
                        handle_cls: Any) -> list[Any]:
    """Node 0: accept every remote rank's two connections on `master_port`, send each its worker recipe, and return
    their handles (`handle_cls(rank, RemoteWorkerProcess, conn)`) in rank order. EngineError naming the missing
    ranks when they do not all connect within `node_timeout_s`."""
    nnodes = getattr(options, "nnodes", 1)
    if nnodes == 1:
        return []
    per_node = world_size // nnodes
    remote = set(range(per_node, world_size))
    listener = mpc.Listener((options.master_addr, options.master_port), authkey=_authkey(), backlog=2 * len(remote))
    msg: dict[int, tuple[Any, str, int]] = {}
    alive: dict[int, Any] = {}
    errors: list[BaseException] = []

    def accept() -> None:
        while set(msg) != remote or set(alive) != remote:
            try:
                conn = listener.accept()
                kind, rank, host, pid = conn.recv()
            except OSError:
                return  # the listener was closed (timeout)
            except Exception as e:  # noqa: BLE001 - a stranger failing authentication
                errors.append(e)
                continue
            if rank not in remote:
                conn.close()
                continue
            _keepalive(conn)
            if kind == HELLO:
                msg[rank] = (conn, host, pid)
            else:
                alive[rank] = conn

    thread = threading.Thread(target=accept, name="weavelm-node-accept", daemon=True)
    thread.start()
    thread.join(options.node_timeout_s)
    listener.close()
    missing = sorted(r for r in remote if r not in msg or r not in alive)
    if missing:
        for conn in [c for c, _, _ in msg.values()] + list(alive.values()):
            conn.close()
        nodes = sorted({r // per_node for r in missing})
        raise EngineError(f"ranks {missing} (nodes {nodes}) did not connect to {options.master_addr}:"
                          f"{options.master_port} within {options.node_timeout_s:g} s; start each node with the "
                          f"same flags plus --node-rank K --headless" + (f" ({errors[0]})" if errors else ""))
    handles = []
    for rank in sorted(remote):
        conn, host, pid = msg[rank]
        conn.send((build_worker, world_size, distributed_init_method))
        handles.append(handle_cls(rank, RemoteWorkerProcess(rank, rank // per_node, host, pid, alive[rank]), conn))
    return handles


# -- the headless node ---------------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _connect(address: tuple[str, int], deadline: float) -> Any:
    while True:
        try:
            return mpc.Client(address, authkey=_authkey())
        except (ConnectionRefusedError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def remote_worker_main(address: tuple[str, int], rank: int, num_threads: int | None, timeout_s: float) -> None:
    """One remote rank: connect to node 0, take its worker recipe, then run the `WorkerProc` loop on that
    connection (it returns when node 0 says shutdown or its connection closes)."""
    from weavelm.core.worker_wrapper import worker_proc_main

    _die_with_parent()
    deadline = time.monotonic() + timeout_s
    host = socket.gethostname()
    conn = _connect(address, deadline)
    conn.send((HELLO, rank, host, os.getpid()))
    alive = _connect(address, deadline)
    alive.send((ALIVE, rank, host, os.getpid()))
    try:
        build_worker, world_size, init = conn.recv()
    except (EOFError, OSError):
        return
    worker_proc_main(build_worker, rank, world_size, init, conn, num_threads)
    alive.close()


def run_headless(options: Any, world_size: int, num_threads: int | None = None) -> int:
    """A headless node: spawn this node's ranks, each of which joins node 0, and wait for them (they end when node
    0's engine shuts down or goes away). Returns 0, or 1 when a worker failed."""
    if getattr(options, "nnodes", 1) < 2 or options.node_rank == 0:
        raise ConfigError([("headless", "--headless runs a node other than node 0 of a multi-node engine: give "
                            "--nnodes N (N > 1) and --node-rank K (K > 0)")])
    ranks = local_ranks(options, world_size)
    threads = num_threads or max(1, (os.cpu_count() or 1) // len(ranks))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=remote_worker_main, name=f"weavelm-worker-{r}", daemon=True,
                         args=((options.master_addr, options.master_port), r, threads, options.node_timeout_s))
             for r in ranks]
    for p in procs:
        p.start()
    logger.info("node %d: ranks %s joining %s:%d", options.node_rank, list(ranks), options.master_addr,
                options.master_port)
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.kill()
    return 0 if all(p.exitcode == 0 for p in procs) else 1


def run_headless_from_args(args: Any) -> int:
    """`weavelm <command> --headless ...`: the node's config from the same flags, then `run_headless`."""
    from weavelm.cli import engine_config_from_args

    config = engine_config_from_args(args)
    options = config.executor.options
    if not isinstance(options, MultiNodeOptions):
        raise ConfigError([("headless", f"the {config.executor.name} executor does not run across nodes with "
                            f"--nnodes; use the multiproc executor (or Ray)")])
    world_size = getattr(options, "tensor_parallel_size", 1) * (getattr(options, "pipeline_parallel_size", 1) or 1)
    return run_headless(options, world_size, config.num_threads)

