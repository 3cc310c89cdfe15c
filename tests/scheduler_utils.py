"""Drive a scheduler on CPU without a model: the test kit's driver (`weavelm.testing.Driver`), re-exported
for the repository's own scheduler tests, plus registry shortcuts for them."""

from __future__ import annotations

from weavelm.plugin import SchedulerContext
from weavelm.testing import (EOS, VOCAB, Driver, FakeRunner, check_scheduler, component, fake_token, make_request,
                             names)

__all__ = ["EOS", "VOCAB", "Driver", "FakeRunner", "check_scheduler", "fake_token", "make_request",
           "make_scheduler", "scheduler_names"]


def scheduler_names() -> list[str]:
    return names("scheduler")


def make_scheduler(name: str, num_blocks: int = 64, block_size: int = 4, max_model_len: int = 256,
                   enable_prefix_caching: bool = True, **options):
    """A registered scheduler with fake block counts. Options its `Options` does not know are dropped, so one
    call works for every plugin."""
    cls = component("scheduler", name)
    known = cls.Options.model_fields
    opts = cls.Options(**{k: v for k, v in options.items() if k in known})
    return cls(opts, SchedulerContext(num_blocks=num_blocks, block_size=block_size, max_model_len=max_model_len,
                                      enable_prefix_caching=enable_prefix_caching))
