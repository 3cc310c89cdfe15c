"""pluggy hook specifications (project name "weavelm").

A plugin is a module (or object) implementing some of these with `@hookimpl`, found through an entry point of
group "weavelm". `weavelm_register` is `historic`: it runs on every plugin as that plugin registers (earlier
and later alike); the event hooks are plain. None is `firstresult`: every implementation is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from weavelm.core.outputs import RequestOutput, SchedulerStats
    from weavelm.core.registry import Registry

PROJECT = "weavelm"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(historic=True)
def weavelm_register(registry: Registry) -> None:
    """Add components with `registry.add(kind, name, cls)`.

    Historic: called once on each plugin when it registers with an engine's registry (each `Registry` is per
    engine, so this runs once per registry), before any component is built. Kinds are those of
    `core.interfaces.COMPONENT_KINDS`. The return value is ignored. A plugin module should also set
    `WEAVELM_API_VERSION = "<major>.<minor>"` (the `weavelm.plugin.API_VERSION` it was written for); a different
    major version is refused at load with an error naming the distribution.
    """


@hookspec
def weavelm_engine_started(config: Any) -> None:
    """Called by the engine core once its components are built and the KV cache is allocated.

    `config` is the validated EngineConfig. Observers only: the return value is ignored.
    """


@hookspec
def weavelm_step_finished(stats: SchedulerStats) -> None:
    """Called after every engine step that ran the model, with that step's scheduler stats."""


@hookspec
def weavelm_request_finished(output: RequestOutput) -> None:
    """Called by the frontend when a request finishes (any reason), with its final RequestOutput."""
