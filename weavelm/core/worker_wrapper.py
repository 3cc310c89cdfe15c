"""Running a Worker in its own process: `WorkerWrapperBase` (builds the configured worker lazily, when told) and
`worker_proc_main`, the loop of one `WorkerProc`, shared by every multi-process executor (multiproc, Ray).

The wrapper is built from picklable data only (the assembler's `build_worker`, which rebuilds the registry from
entry points in this process), so it can be created before CUDA or torch.distributed are initialised here.
"""

from __future__ import annotations

import os
import pickle
import signal
import traceback
from typing import Any

from weavelm.core.interfaces import Worker

# messages from the executor to a WorkerProc: (kind, payload) pickled once and broadcast to every rank
RPC, STEP, SHUTDOWN = "rpc", "step", "shutdown"
# replies from a WorkerProc: (status, payload)
OK, ERROR = "ok", "error"


class WorkerWrapperBase:
    """Holds one rank's worker. `init_worker()` builds it (the configured worker plugin) only when the executor says
    so; `execute_method(name, *args)` calls a method on the wrapper itself when it has one, else on the worker
    (what `Executor.collective_rpc` reaches)."""

    def __init__(self, build_worker: Any, rank: int, world_size: int, distributed_init_method: str | None = None):
        self.build_worker = build_worker
        self.rank = rank
        self.world_size = world_size
        self.distributed_init_method = distributed_init_method
        self.worker: Worker | None = None

    def init_worker(self) -> None:
        if self.worker is None:
            self.worker = self.build_worker(self.rank, self.world_size, self.distributed_init_method)

    def pid(self) -> int:
        return os.getpid()

    def execute_method(self, method: str, *args: Any, **kwargs: Any) -> Any:
        target = self if method in ("init_worker", "pid") else self.worker
        if target is None:
            raise RuntimeError(f"rank {self.rank}: {method!r} called before init_worker")
        return getattr(target, method)(*args, **kwargs)


def _reply(conn: Any, status: str, payload: Any) -> None:
    conn.send_bytes(pickle.dumps((status, payload), protocol=pickle.HIGHEST_PROTOCOL))


def worker_proc_main(build_worker: Any, rank: int, world_size: int, distributed_init_method: str | None,
                     conn: Any, num_threads: int | None = None, output_rank: int = 0) -> None:
    """The WorkerProc loop: receive broadcast messages on `conn`, run them, reply. Every rank replies to an RPC;
    only `output_rank` replies to a step (its `ModelRunnerOutput`: rank 0, or with pipeline parallelism the first
    rank of the last stage), any rank replies when its step raised. Ctrl-C is left
    to the parent, which shuts the workers down. `num_threads`: torch's CPU threads in this process until the
    runner sets its own (the executor passes the config's `num_threads`, else its share of the cores)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if num_threads:
        import torch

        torch.set_num_threads(num_threads)
    wrapper = WorkerWrapperBase(build_worker, rank, world_size, distributed_init_method)
    while True:
        try:
            kind, payload = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):  # the executor is gone
            return
        if kind == SHUTDOWN:
            _reply(conn, OK, None)
            return
        try:
            if kind == STEP:
                output = wrapper.worker.execute_model(payload)
                if rank == output_rank:
                    _reply(conn, OK, output)
            else:
                method, args, kwargs = payload
                _reply(conn, OK, wrapper.execute_method(method, *args, **kwargs))
        except Exception as e:  # reported to the executor, which decides whether the engine can go on
            _reply(conn, ERROR, (_picklable(e), f"{type(e).__name__}: {e}", traceback.format_exc()))


def _picklable(error: Exception) -> Exception | None:
    """The exception itself when it survives pickling (typed WeaveErrors reach the caller as such), else None."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return None
