"""EngineCoreClient: how the frontend talks to the engine core. InprocClient runs the core in this process."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from typing import Any

from weavelm.core.config import EngineConfig
from weavelm.core.engine_core import EngineCore
from weavelm.core.outputs import EngineCoreOutput, SchedulerStats
from weavelm.core.registry import Registry
from weavelm.core.request import Request
from weavelm.errors import EngineError


class EngineCoreClient(ABC):
    max_model_len: int
    model_info: dict[str, Any]
    thread_safe: bool = False  # whether its calls may come from several threads at once (else the frontend locks)

    @abstractmethod
    def add_request(self, request: Request) -> None: ...

    @abstractmethod
    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]: ...

    @abstractmethod
    def get_output(self) -> list[EngineCoreOutput]:
        """Run (or wait for) one core step and return its per-request deltas."""

    @abstractmethod
    def has_unfinished_requests(self) -> bool: ...

    @abstractmethod
    def get_stats(self) -> SchedulerStats:
        """The core's current scheduler stats."""

    @abstractmethod
    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None,
                       ranks: list[int] | None = None) -> list[Any]:
        """Call a method on every worker (see `Executor.collective_rpc`) once no step is in flight."""

    def shutdown(self) -> None:
        pass


class InprocClient(EngineCoreClient):
    def __init__(self, config: EngineConfig, registry: Registry, overlap: bool = True, loader: Any = None):
        self.core = EngineCore(config, registry, loader)
        self.overlap = overlap
        self._pending: deque = deque()  # launched steps, oldest first (two at most, with async scheduling)
        self.max_model_len = self.core.max_model_len
        self.model_info = self.core.model_info

    def add_request(self, request: Request) -> None:
        self.core.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        return self.core.abort_requests(request_ids)

    def get_output(self) -> list[EngineCoreOutput]:
        """Collect the oldest launched step and return its outputs, with the next step already launched, so the
        caller's output processing overlaps the device's work on it. With async scheduling the next step is
        launched *before* the oldest is collected, so the device never waits for scheduling or input
        preparation either."""
        core, pending = self.core, self._pending
        if not pending:
            self._launch()
        if core.async_scheduling and pending:
            self._launch()
        outputs = core.step_end(pending.popleft()) if pending else []
        while pending and not core.has_unfinished_requests():
            outputs += core.step_end(pending.popleft())  # launched for requests that have all finished since
        if self.overlap and not pending:
            self._launch()
        return outputs

    def _launch(self) -> None:
        step = self.core.step_begin()
        if step is not None:
            self._pending.append(step)

    def has_unfinished_requests(self) -> bool:
        return bool(self._pending) or self.core.has_unfinished_requests()

    def get_stats(self) -> SchedulerStats:
        return self.core.get_stats()

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None,
                       ranks: list[int] | None = None) -> list[Any]:
        if self._pending:
            raise EngineError("collective_rpc: a step is in flight; call it between requests (after drain())")
        return self.core.collective_rpc(method, args, kwargs, ranks)

    def drain(self) -> list[EngineCoreOutput]:
        """Collect the launched steps, if any, without launching another (before driving the core directly)."""
        outputs: list[EngineCoreOutput] = []
        while self._pending:
            outputs += self.core.step_end(self._pending.popleft())
        return outputs

    def shutdown(self) -> None:
        try:
            self.drain()
        except EngineError:  # a dead or failing executor still has to release its workers
            pass
        self.core.shutdown()
