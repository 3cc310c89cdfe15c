"""EngineCore: builds the executor and scheduler from the config and runs schedule -> execute -> update."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from weavelm.core.config import EngineConfig
from weavelm.core.interfaces import SchedulerContext
from weavelm.core.outputs import EngineCoreOutput, RunnerFuture, SchedulerOutput, SchedulerStats
from weavelm.core.registry import Registry, get_registry
from weavelm.core.request import Request, RequestStatus
from weavelm.errors import EngineError, RequestError

logger = logging.getLogger("weavelm.engine")


@dataclass
class PendingStep:
    """A scheduled step whose device work was launched but not yet collected."""

    scheduler_output: SchedulerOutput
    future: RunnerFuture

MAX_IDLE_STEPS = 64


class EngineCore:
    """The inner loop. Owns one executor and one scheduler; everything else talks to it through a client."""

    def __init__(self, config: EngineConfig, registry: Registry | None = None):
        self.config = config
        self.registry = registry or get_registry()
        executor_cls = self.registry.get("executor", config.executor.name)
        self.executor = executor_cls(config.executor.options, config)
        self.model_info: dict[str, Any] = self.executor.model_info()
        self.num_blocks = self.executor.determine_num_blocks()
        self.executor.initialize_cache(self.num_blocks)
        block_size = config.cache.block_size
        max_len = int(self.model_info.get("max_model_len", 4096))
        if max_len > self.num_blocks * block_size:
            logger.warning("max_model_len %d exceeds the KV cache (%d blocks x %d tokens); capping it to %d",
                           max_len, self.num_blocks, block_size, self.num_blocks * block_size)
            max_len = self.num_blocks * block_size
        self.max_model_len = max_len
        scheduler_cls = self.registry.get("scheduler", config.scheduler.name)
        self.scheduler = scheduler_cls(config.scheduler.options, SchedulerContext(
            num_blocks=self.num_blocks, block_size=block_size, max_model_len=max_len,
            enable_prefix_caching=config.cache.enable_prefix_caching))
        self.last_stats = SchedulerStats()
        self._idle_steps = 0
        self.registry.hook.weavelm_engine_started(config=config)

    def add_request(self, request: Request) -> None:
        """Queue a request, or raise RequestError (nothing queued) when the scheduler can never run it."""
        reason = self.scheduler.check_request(request)
        if reason is not None:
            raise RequestError(reason)
        self.scheduler.add_request(request)

    def get_stats(self) -> SchedulerStats:
        """The scheduler's current stats (running / waiting requests, KV blocks used and total, hit rate)."""
        return self.scheduler.get_stats()

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        return self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        """One synchronous step: schedule -> execute -> update."""
        pending = self.step_begin()
        return self.step_end(pending) if pending is not None else []

    def step_begin(self) -> PendingStep | None:
        """Schedule and launch a step without waiting for the device; None when there is nothing to run."""
        if not self.scheduler.has_unfinished_requests():
            return None
        so = self.scheduler.schedule()
        if so.is_empty:
            self._idle_steps += 1
            if self._idle_steps > MAX_IDLE_STEPS:
                raise EngineError(f"the scheduler made no progress for {MAX_IDLE_STEPS} steps with "
                                  f"{self.scheduler.get_stats()}; the KV cache is too small for the requests")
        else:
            self._idle_steps = 0
        return PendingStep(so, self.executor.execute_model_async(so))

    def step_end(self, pending: PendingStep) -> list[EngineCoreOutput]:
        """Wait for a launched step and fold its output into the scheduler. Must precede the next step_begin."""
        outputs = self.scheduler.update_from_output(pending.scheduler_output, pending.future.result())
        self.last_stats = self.scheduler.get_stats()
        if not pending.scheduler_output.is_empty:
            self.registry.hook.weavelm_step_finished(stats=self.last_stats)
        return outputs

    def shutdown(self) -> None:
        self.executor.shutdown()
