"""A scheduler registered only by tests/test_engine_process.py (through `registry.register_module`, so the registry
spec carries it into the engine-core process): it raises inside `schedule()` once a waiting request's prompt
starts with POISON, an exception the core's step isolation does not catch, so the core process dies of it."""

from __future__ import annotations

from weavelm.plugin import hookimpl
from weavelm.plugins.schedulers.fcfs import FCFSScheduler

POISON = 13


class SchedulerExploded(RuntimeError):
    pass


class ExplodingScheduler(FCFSScheduler):
    name = "exploding"

    def schedule(self):
        if any(r.prompt_token_ids[:1] == [POISON] for r in self.waiting):
            raise SchedulerExploded(f"poisoned prompt (token {POISON}) reached schedule()")
        return super().schedule()


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("scheduler", ExplodingScheduler.name, ExplodingScheduler)
