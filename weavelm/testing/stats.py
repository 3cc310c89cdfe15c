"""`StepRecorder`: every step's `SchedulerStats`, observed through the public `weavelm_step_finished` hook.

    from weavelm.testing import StepRecorder

    recorder = StepRecorder()
    llm = LLM(model=..., registry=recorder.registry())   # or recorder.attach(registry) for a registry you built
    llm.generate(...)
    assert recorder.num_preempted > 0

The hook fires in the engine core's process, so the recorder sees in-process engines (not `engine_process: true`).
"""

from __future__ import annotations

from typing import Any

from weavelm.core.hookspecs import hookimpl
from weavelm.core.outputs import SchedulerStats


class StepRecorder:
    """A plugin object implementing `weavelm_step_finished`; `steps` holds each step's stats in order."""

    def __init__(self) -> None:
        self.steps: list[SchedulerStats] = []

    @hookimpl
    def weavelm_step_finished(self, stats: SchedulerStats) -> None:
        self.steps.append(stats)

    def attach(self, registry: Any) -> Any:
        """Register on `registry` (an engine's `Registry`) and return it."""
        registry.pm.register(self, name=f"step-recorder-{id(self)}")
        return registry

    def registry(self) -> Any:
        """A fresh registry loaded from the installed entry points, with this recorder attached."""
        from weavelm.core.registry import Registry

        return self.attach(Registry.load())

    @property
    def num_preempted(self) -> int:
        """Preemptions over all recorded steps."""
        return sum(s.num_preempted for s in self.steps)

    @property
    def scheduled_ahead(self) -> bool:
        """Whether any step was scheduled before the previous one's output arrived (async scheduling ran)."""
        return any(s.num_output_placeholders > 0 for s in self.steps)
