"""The multiproc executor: one `WorkerProc` per rank (tensor x pipeline parallel), each its own spawned process.

MultiprocExecutor -> WorkerProc (spawned; never forked after CUDA init) -> WorkerWrapperBase (builds the worker
when told) -> Worker -> ModelRunner. Every message is pickled once and broadcast to every rank over its own pipe (the
measured choice on these machines: see benchmarks/RESULTS.md "executor message queue"); a step's
`ModelRunnerOutput` comes back from the output rank only (rank 0; with pipeline parallelism tensor rank 0 of the
last stage, and one launched step per stage is in flight: `max_concurrent_batches`). A rank that dies is noticed
through its process sentinel within a second, and every caller then gets an `EngineDeadError` naming the rank, its
pipeline stage, its pid and exit code.

Across nodes (`nnodes > 1`, `weavelm.plugins.executors.multinode`): node 0 spawns its own ranks and accepts the other
nodes' ranks over TCP connections that stand in for their pipes; the hooks here are `MultiNodeOptions` (the options),
`local_ranks` / `init_method` / `check_driver` in `__init__`, `join_remote_workers`, and a remote process's
`describe` in `WorkerProcHandle.death`.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection as mpc
import os
import pickle
import socket
import weakref
from functools import partial
from typing import Any

from pydantic import ConfigDict, Field

from weavelm.core.contexts import ExecutorContext
from weavelm.core.hookspecs import hookimpl
from weavelm.core.interfaces import Executor
from weavelm.core.outputs import ModelRunnerOutput, RunnerFuture, SchedulerOutput
from weavelm.core.worker_wrapper import ERROR, RPC, SHUTDOWN, STEP, worker_proc_main
from weavelm.distributed import ParallelLayout, check_pipeline_config
from weavelm.errors import EngineDeadError, EngineError, WeaveError
from weavelm.plugins.executors import multinode

logger = logging.getLogger("weavelm.executor")
POLL_S = 1.0


class MultiprocOptions(multinode.MultiNodeOptions):
    model_config = ConfigDict(extra="forbid")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="Ranks (processes) the model is sharded over.")
    enable_expert_parallel: bool = Field(False, description="Spread each MoE layer's experts over the ranks "
                                         "(whole experts per rank, tokens dispatched to them) instead of sharding "
                                         "every expert; attention stays tensor-parallel (vLLM's flag).")
    pipeline_parallel_size: int = Field(1, ge=1, le=64, description="Pipeline stages the layers are split over "
                                        "(each stage has tensor_parallel_size ranks).")
    shutdown_timeout_s: float = Field(10.0, gt=0, le=600, description="Wait for workers to exit before killing.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerProcHandle:
    """The parent's end of one WorkerProc: its process and its pipe. `where`: its place in the layout, for
    messages (e.g. " of pipeline stage 1")."""

    def __init__(self, rank: int, process: Any, conn: Any, where: str = ""):
        self.rank, self.process, self.conn, self.where = rank, process, conn, where

    def death(self) -> str:
        remote = getattr(self.process, "describe", None)  # a rank on another node (multinode)
        if remote is not None:
            return f"{remote()} closed its connection: the worker or its node died"
        self.process.join(2)
        code = self.process.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        return f"worker rank {self.rank} (pid {self.process.pid}){self.where} {how}"



def _shutdown(handles: list[WorkerProcHandle], timeout: float) -> None:
    message = pickle.dumps((SHUTDOWN, None))
    for h in handles:
        try:
            h.conn.send_bytes(message)
        except OSError:
            pass
    for h in handles:
        h.process.join(timeout)
    for h in handles:
        if h.process.is_alive():
            h.process.kill()
            h.process.join(5)
        h.conn.close()


class MultiprocExecutor(Executor):
    name = "multiproc"
    description = ("One spawned worker process per rank (tensor x pipeline parallel); broadcasts steps, the last "
                   "stage's first rank answers.")
    Options = MultiprocOptions

    def __init__(self, options: MultiprocOptions, context: ExecutorContext):
        super().__init__(options, context)
        check_pipeline_config(context.config, options.pipeline_parallel_size)
        self.layout = ParallelLayout(tensor=options.tensor_parallel_size, pipeline=options.pipeline_parallel_size,
                                     expert=options.enable_expert_parallel)
        self.world_size = self.layout.world_size
        self.output_rank = self.layout.output_rank
        self.dead: str | None = None
        self._step_futures: list[_ProcStepFuture] = []
        multinode.check_driver(options)
        init_method = multinode.init_method(options, self.world_size, free_port())
        threads = context.config.num_threads or max(1, (os.cpu_count() or 1) // self.world_size)
        ctx = multiprocessing.get_context("spawn")
        self.handles: list[WorkerProcHandle] = []
        build_worker = partial(context.build_worker, layout=self.layout)
        for rank in multinode.local_ranks(options, self.world_size):
            parent_conn, child_conn = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=worker_proc_main, name=f"weavelm-worker-{rank}", daemon=True,
                               args=(build_worker, rank, self.world_size, init_method, child_conn, threads,
                                     self.output_rank))
            proc.start()
            child_conn.close()
            self.handles.append(WorkerProcHandle(rank, proc, parent_conn, self.layout.where(rank)))
        self._finalizer = weakref.finalize(self, _shutdown, self.handles, options.shutdown_timeout_s)
        try:
            self.handles += multinode.join_remote_workers(options, self.world_size, build_worker,
                                                          init_method, WorkerProcHandle)
        except BaseException:
            self._finalizer()
            raise
        self.start_workers()

    # -- messages -----------------------------------------------------------------------------------------
    def _broadcast(self, message: tuple, ranks: list[int]) -> None:
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for rank in ranks:
            try:
                self.handles[rank].conn.send_bytes(data)
            except OSError:
                self._check_alive()
                raise

    def _check_alive(self) -> None:
        for h in self.handles:
            if not h.process.is_alive():
                self._die(h.death())

    def _die(self, why: str) -> None:
        self.dead = self.dead or why
        raise EngineDeadError(self.dead)

    def _receive(self, ranks: list[int], watch_all: bool) -> dict[int, Any]:
        """Wait for one reply from each of `ranks`; with `watch_all` an error from any other rank counts too. A dead
        process or a closed pipe makes the engine dead."""
        waiting = set(ranks)
        replies: dict[int, Any] = {}
        watched = self.handles if watch_all else [self.handles[r] for r in ranks]
        while waiting:
            conns = {h.conn: h for h in watched if h.rank in waiting or watch_all}
            sentinels = {h.process.sentinel: h for h in self.handles}
            for ready in mpc.wait(list(conns) + list(sentinels), timeout=POLL_S):
                if ready in sentinels and ready not in conns:
                    if not sentinels[ready].conn.poll():
                        self._die(sentinels[ready].death())
                    continue
                h = conns[ready]
                try:
                    status, payload = pickle.loads(h.conn.recv_bytes())
                except (EOFError, OSError):
                    h.process.join(1)
                    self._die(h.death())
                if status == ERROR:
                    self._raise_worker_error(h.rank, payload)
                replies[h.rank] = payload
                waiting.discard(h.rank)
        return replies

    def _wait_for_a_death(self, timeout: float) -> WorkerProcHandle | None:
        sentinels = {h.process.sentinel: h for h in self.handles}
        ready = mpc.wait(list(sentinels), timeout=timeout)
        return sentinels[ready[0]] if ready else None

    def _raise_worker_error(self, rank: int, payload: tuple) -> None:
        error, text, tb = payload
        logger.error("worker rank %d raised:\n%s", rank, tb)
        if self.world_size > 1 and self._step_futures:
            # ranks of one model run collectives together: one failing mid-step leaves the others unusable. A rank
            # whose peer died fails in its collective first; name the dead peer when there is one.
            dead = self._wait_for_a_death(2.0)
            if dead is not None:
                self._die(f"{dead.death()} (rank {rank} then failed: {text})")
            self._die(f"worker rank {rank}{self.layout.where(rank)} failed during a parallel step: {text}\n{tb}")
        if isinstance(error, WeaveError):
            raise error
        raise EngineError(f"worker rank {rank}: {text}")

    # -- Executor -----------------------------------------------------------------------------------------
    @property
    def max_concurrent_batches(self) -> int:
        return self.layout.pipeline

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None,
                       ranks: list[int] | None = None) -> list[Any]:
        ranks = list(range(self.world_size)) if ranks is None else list(ranks)
        self._broadcast((RPC, (method, tuple(args), kwargs or {})), ranks)
        replies = self._receive(ranks, watch_all=False)
        return [replies[r] for r in ranks]

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> RunnerFuture:
        self._broadcast((STEP, scheduler_output), list(range(self.world_size)))
        future = _ProcStepFuture(self)
        self._step_futures.append(future)
        return future

    def _collect_step(self) -> ModelRunnerOutput:
        try:
            return self._receive([self.output_rank], watch_all=True)[self.output_rank]
        finally:
            self._step_futures.pop(0)

    def shutdown(self) -> None:
        self._finalizer()


class _ProcStepFuture(RunnerFuture):
    def __init__(self, executor: MultiprocExecutor):
        super().__init__()
        self._executor = executor

    def result(self) -> ModelRunnerOutput:
        if self._output is None:
            self._output = self._executor._collect_step()
        return self._output


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("executor", MultiprocExecutor.name, MultiprocExecutor)
