"""The Ray executor: one Ray actor per rank (tensor x pipeline parallel), placed with a placement group, speaking
the same `collective_rpc` and step messages as `multiproc` (each actor holds a `WorkerWrapperBase`); the output rank
(tensor rank 0 of the last pipeline stage) answers steps.

Across nodes: `ray start --head` on one node, `ray start --address=<head>:6379` on the others, then run weavelm with
`executor: {name: ray, tensor_parallel_size: N, address: auto}` on the head (docs/parallel.md has the commands).
The placement group's bundles land on the nodes by `placement_strategy` (PACK, as vLLM: fill a node before the
next; STRICT_SPREAD: one rank per node); the ranks then join one torch.distributed group at rank 0's node address.
A rank whose actor dies (its process, or its node) is an `EngineDeadError` naming the rank, its node and pid; a
rank failing in a collective because a peer died reports the dead peer. Ray is imported only when this executor is
built (extra `[ray]`).
"""

from __future__ import annotations

import logging
import weakref
from functools import partial
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from weavelm.core.contexts import ExecutorContext
from weavelm.core.hookspecs import hookimpl
from weavelm.core.interfaces import Executor
from weavelm.core.outputs import ModelRunnerOutput, RunnerFuture, SchedulerOutput
from weavelm.distributed import ParallelLayout, check_pipeline_config
from weavelm.errors import ConfigError, EngineDeadError, EngineError, WeaveError

logger = logging.getLogger("weavelm.executor")


class RayOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tensor_parallel_size: int = Field(1, ge=1, le=512, description="Ranks (Ray actors) the model is sharded over.")
    enable_expert_parallel: bool = Field(False, description="Spread each MoE layer's experts over the ranks "
                                         "(whole experts per rank, tokens dispatched to them) instead of sharding "
                                         "every expert; attention stays tensor-parallel (vLLM's flag).")
    pipeline_parallel_size: int = Field(1, ge=1, le=64, description="Pipeline stages the layers are split over "
                                        "(each stage has tensor_parallel_size actors).")
    address: str | None = Field(None, description="Ray cluster to join (`auto`, or host:port); default: the "
                                "running local instance, else a new local one.")
    num_cpus_per_worker: float = Field(1.0, ge=0, description="CPUs each rank's actor reserves.")
    placement_strategy: str = Field("PACK", pattern="^(PACK|SPREAD|STRICT_PACK|STRICT_SPREAD)$",
                                    description="Placement-group strategy for the ranks' bundles.")


def _actor_class():
    import ray

    from weavelm.core.worker_wrapper import WorkerWrapperBase

    @ray.remote
    class RayWorker:
        """One rank: a WorkerWrapperBase inside a Ray actor."""

        def __init__(self, build_worker: Any, rank: int, world_size: int, output_rank: int = 0):
            self.args = (build_worker, rank, world_size)
            self.output_rank = output_rank
            self.wrapper: WorkerWrapperBase | None = None

        def where(self) -> tuple[str, int]:
            """(node address, pid) of this rank."""
            import os

            return ray.util.get_node_ip_address(), os.getpid()

        def address(self) -> tuple[str, int]:
            import socket

            with socket.socket() as s:
                s.bind(("", 0))
                return ray.util.get_node_ip_address(), s.getsockname()[1]

        def setup(self, distributed_init_method: str | None) -> None:
            self.wrapper = WorkerWrapperBase(*self.args, distributed_init_method)

        def execute_method(self, method: str, args: tuple, kwargs: dict) -> Any:
            return self.wrapper.execute_method(method, *args, **kwargs)

        def execute_step(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
            output = self.wrapper.worker.execute_model(scheduler_output)
            return output if self.wrapper.rank == self.output_rank else None

    return RayWorker


class RayExecutor(Executor):
    name = "ray"
    description = "One Ray actor per rank (tensor x pipeline parallel, placement group); local or multi-node."
    Options = RayOptions

    def __init__(self, options: RayOptions, context: ExecutorContext):
        super().__init__(options, context)
        try:
            import ray
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        except ImportError as e:
            raise ConfigError([("executor", f"the ray executor needs Ray: pip install 'weavelm[ray]' ({e})")]) from e
        self._ray = ray
        check_pipeline_config(context.config, options.pipeline_parallel_size)
        if not ray.is_initialized():
            ray.init(address=options.address, ignore_reinit_error=True, log_to_driver=False)
        self.layout = ParallelLayout(tensor=options.tensor_parallel_size, pipeline=options.pipeline_parallel_size,
                                     expert=options.enable_expert_parallel)
        self.world_size, self.output_rank = self.layout.world_size, self.layout.output_rank
        gpus = 1 if context.config.device == "cuda" else 0
        bundle = {"CPU": options.num_cpus_per_worker, **({"GPU": gpus} if gpus else {})}
        self.placement = placement_group([dict(bundle) for _ in range(self.world_size)],
                                         strategy=options.placement_strategy)
        try:
            ray.get(self.placement.ready(), timeout=120)
        except ray.exceptions.GetTimeoutError as e:
            ray.util.remove_placement_group(self.placement)
            raise EngineError(f"Ray could not place {self.world_size} workers of {bundle} within 120 s; the cluster "
                              f"has {ray.available_resources()} free") from e
        actor = _actor_class()
        self.actors = [
            actor.options(num_cpus=options.num_cpus_per_worker, num_gpus=gpus,
                          scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, rank)).remote(
                partial(context.build_worker, layout=self.layout), rank, self.world_size, self.output_rank)
            for rank in range(self.world_size)]
        init_method = None
        if self.world_size > 1:
            host, port = self._get([self.actors[0].address.remote()])[0]
            init_method = f"tcp://{host}:{port}"
        self._finalizer = weakref.finalize(self, _release, ray, list(self.actors), self.placement)
        self.locations = self._get([a.where.remote() for a in self.actors])
        self._get([a.setup.remote(init_method) for a in self.actors])
        self.start_workers()

    def _describe(self, rank: int) -> str:
        where = getattr(self, "locations", None)
        if where is None or rank >= len(where):
            return f"Ray worker rank {rank}{self.layout.where(rank)}"
        return f"Ray worker rank {rank}{self.layout.where(rank)} (node {where[rank][0]}, pid {where[rank][1]})"

    def _get(self, refs: list[Any], ranks: list[int] | None = None) -> list[Any]:
        """The results of `refs` (one per rank of `ranks`, default 0..). A dead actor is an EngineDeadError naming
        its rank; a task error waits up to 2 s for the other ranks, so that a peer's death (the usual cause of a
        failed collective) is what gets reported."""
        ray = self._ray
        ranks = list(range(len(refs))) if ranks is None else list(ranks)
        pending = dict(zip(refs, ranks))
        results: dict[int, Any] = {}
        failed: tuple[int, Any] | None = None
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=None if failed is None else 2.0)
            if not ready:
                break  # after a failure: the other ranks are stuck in a collective
            for ref in ready:
                rank = pending.pop(ref)
                try:
                    results[rank] = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    raise EngineDeadError(f"{self._describe(rank)} died: {e}") from e
                except ray.exceptions.RayTaskError as e:
                    failed = failed or (rank, e)
        if failed is not None:
            rank, e = failed
            cause = e.as_instanceof_cause()
            if isinstance(cause, WeaveError):
                raise cause from e
            raise EngineError(f"{self._describe(rank)} failed: {e}") from e
        return [results[r] for r in ranks]

    @property
    def max_concurrent_batches(self) -> int:
        return self.layout.pipeline

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None,
                       ranks: list[int] | None = None) -> list[Any]:
        ranks = list(range(self.world_size)) if ranks is None else list(ranks)
        return self._get([self.actors[r].execute_method.remote(method, tuple(args), kwargs or {}) for r in ranks],
                         ranks)

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> RunnerFuture:
        refs = [a.execute_step.remote(scheduler_output) for a in self.actors]
        return _RayStepFuture(self, refs)

    def shutdown(self) -> None:
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()
        self.actors = []


def _release(ray: Any, actors: list[Any], placement: Any) -> None:
    """Kill the rank actors and free their placement group (shutdown, garbage collection or interpreter exit)."""
    if not ray.is_initialized():
        return
    for actor in actors:
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 - already gone
            pass
    try:
        ray.util.remove_placement_group(placement)
    except Exception:  # noqa: BLE001 - already removed
        pass


class _RayStepFuture(RunnerFuture):
    def __init__(self, executor: RayExecutor, refs: list[Any]):
        super().__init__()
        self._executor, self._refs = executor, refs

    def result(self) -> ModelRunnerOutput:
        if self._output is None:
            self._output = self._executor._get(self._refs)[self._executor.output_rank]
        return self._output


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("executor", RayExecutor.name, RayExecutor)
