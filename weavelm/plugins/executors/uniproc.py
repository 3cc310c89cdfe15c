"""The in-process executor: one worker in the engine core's own process."""

from __future__ import annotations

from typing import Any

from weavelm.core.hookspecs import hookimpl
from weavelm.core.interfaces import Executor, NoOptions
from weavelm.core.outputs import ModelRunnerOutput, RunnerFuture, SchedulerOutput
from weavelm.core.registry import get_registry


class UniprocExecutor(Executor):
    name = "uniproc"
    description = "One worker in the engine's own process."
    Options = NoOptions

    def __init__(self, options: NoOptions, config: Any):
        super().__init__(options, config)
        worker_cls = get_registry().get("worker", config.worker.name)
        self.worker = worker_cls(config.worker.options, config, rank=0, world_size=1)
        self.worker.init_device()
        self.worker.load_model()

    def model_info(self) -> dict[str, Any]:
        return self.worker.model_info()

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
