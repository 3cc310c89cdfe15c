"""Deprecated location of the scheduling-policy base: import `BaseScheduler` and `SchedulerOptions` from
`weavelm.plugin` (they live in `weavelm/scheduling.py`). Kept so plugins written for API 1.x import unchanged."""

from weavelm.scheduling import BaseScheduler, SchedulerOptions

__all__ = ["BaseScheduler", "SchedulerOptions"]
