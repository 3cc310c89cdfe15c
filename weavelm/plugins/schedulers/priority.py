"""Priority scheduling: lower `SamplingParams.priority` runs first, arrival breaks ties (FCFS among equals)."""

from __future__ import annotations

import itertools

from pydantic import Field

from weavelm.core.hookspecs import hookimpl
from weavelm.core.contexts import SchedulerContext
from weavelm.core.request import Request
from weavelm.scheduling import BaseScheduler, SchedulerOptions


class PriorityOptions(SchedulerOptions):
    preempt_for_higher_priority: bool = Field(
        True, description="Let a waiting request preempt a running request of lower priority (higher value).")


class PriorityScheduler(BaseScheduler):
    """Admits the waiting request of lowest (priority, arrival); preempts the running request of highest."""

    name = "priority"
    description = "Lower priority value first, arrival breaks ties; preempts the lowest-priority running request."
    Options = PriorityOptions

    def __init__(self, options: PriorityOptions, context: SchedulerContext):
        super().__init__(options, context)
        self._order: dict[str, int] = {}  # add order: breaks ties between equal arrival times
        self._counter = itertools.count()

    def _rank(self, r: Request) -> tuple[int, float, int]:
        return (r.priority, r.arrival_time, self._order[r.request_id])

    def add_request(self, request: Request) -> None:
        super().add_request(request)
        self._order[request.request_id] = next(self._counter)

    def _release(self, req: Request) -> None:
        super()._release(req)
        del self._order[req.request_id]

    def next_waiting_index(self) -> int:
        waiting, rank = self.waiting, self._rank
        return min(range(len(waiting)), key=lambda i: rank(waiting[i]))

    def select_victim(self, candidates: list[Request], for_request: Request) -> Request | None:
        return max(candidates, key=self._rank) if candidates else None

    def may_preempt_for_waiting(self, waiting: Request, victim: Request) -> bool:
        return self.options.preempt_for_higher_priority and waiting.priority < victim.priority

    def requeue_preempted(self, request: Request) -> None:
        self.waiting.append(request)


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("scheduler", PriorityScheduler.name, PriorityScheduler)
