"""Priority scheduling: lower `SamplingParams.priority` runs first, arrival time breaks ties."""

from __future__ import annotations

from pydantic import Field

from weavelm.core.hookspecs import hookimpl
from weavelm.core.request import Request
from weavelm.plugins.schedulers.base import BaseScheduler, SchedulerOptions


class PriorityOptions(SchedulerOptions):
    preempt_for_higher_priority: bool = Field(
        True, description="Let a waiting request preempt a running request of lower priority.")


def _rank(r: Request) -> tuple[int, float]:
    return (r.priority, r.arrival_time)


class PriorityScheduler(BaseScheduler):
    """Admits the waiting request of lowest (priority, arrival); preempts the running request of highest."""

    name = "priority"
    description = "Lower priority value first, arrival breaks ties; preempts the lowest-priority running request."
    Options = PriorityOptions

    def next_waiting_index(self) -> int:
        return min(range(len(self.waiting)), key=lambda i: _rank(self.waiting[i]))

    def select_victim(self, candidates: list[Request], for_request: Request) -> Request | None:
        return max(candidates, key=_rank) if candidates else None

    def may_preempt_for_waiting(self, waiting: Request, victim: Request) -> bool:
        return self.options.preempt_for_higher_priority and waiting.priority < victim.priority

    def requeue_preempted(self, request: Request) -> None:
        self.waiting.append(request)


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("scheduler", PriorityScheduler.name, PriorityScheduler)
