"""The in-process executor: one worker in the engine core's own process. With `data_parallel_size > 1` and
`enable_expert_parallel` (DP attention + EP MoE) that worker is one rank of the world the replicas share
(`weavelm.core.dp_layout`), joined from the engine core's process."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from weavelm.core.contexts import ExecutorContext
from weavelm.core.dp_layout import replica_world
from weavelm.core.hookspecs import hookimpl
from weavelm.core.interfaces import Executor
from weavelm.core.outputs import ModelRunnerOutput, RunnerFuture, SchedulerOutput
from weavelm.distributed import ParallelLayout


class UniprocOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enable_expert_parallel: bool = Field(False, description="With data_parallel_size > 1: spread each MoE layer's "
                                         "experts over the replicas (DP attention + EP MoE); one replica alone has "
                                         "nothing to spread.")


class UniprocExecutor(Executor):
    name = "uniproc"
    description = "One worker in the engine's own process."
    Options = UniprocOptions

    def __init__(self, options: UniprocOptions, context: ExecutorContext):
        super().__init__(options, context)
        layout, rank, init_method = replica_world(context.config,
                                                  ParallelLayout(expert=options.enable_expert_parallel))
        if layout.world_size == 1:
            self.worker = context.build_worker(0, 1)
        else:  # one rank of the world the data-parallel replicas share
            self.worker = context.build_worker(rank, layout.world_size, init_method, layout=layout)
        self.worker.init_device()
        self.worker.load_model()

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None,
                       ranks: list[int] | None = None) -> list[Any]:
        if ranks is not None and list(ranks) not in ([], [0]):
            raise ValueError(f"collective_rpc: uniproc has only rank 0 (got ranks={ranks})")
        if ranks == []:
            return []
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def initialize_cache(self, num_blocks: int) -> None:
        self.worker.initialize_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output)

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> RunnerFuture:
        return self.worker.execute_model_async(scheduler_output)


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("executor", UniprocExecutor.name, UniprocExecutor)
