"""First-come-first-served scheduling with continuous batching, chunked prefill and prefix caching."""

from __future__ import annotations

from weavelm.core.hookspecs import hookimpl
from weavelm.scheduling import BaseScheduler


class FCFSScheduler(BaseScheduler):
    """Admits waiting requests in arrival order; when blocks run out, preempts the latest-admitted request."""

    name = "fcfs"
    description = "First come, first served; preempts the most recently admitted request when KV runs out."


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("scheduler", FCFSScheduler.name, FCFSScheduler)
