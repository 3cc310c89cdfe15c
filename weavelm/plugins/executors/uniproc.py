"""The in-process executor: one worker in the engine core's own process."""

from __future__ import annotations

from typing import Any

from weavelm.core.contexts import ExecutorContext
from weavelm.core.hookspecs import hookimpl
from weavelm.core.interfaces import Executor, NoOptions
from weavelm.core.outputs import ModelRunnerOutput, RunnerFuture, SchedulerOutput


class UniprocExecutor(Executor):
    name = "uniproc"
    description = "One worker in the engine's own process."
    Options = NoOptions

    def __init__(self, options: NoOptions, context: ExecutorContext):
        super().__init__(options, context)
        self.worker = context.build_worker(0, 1)
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
