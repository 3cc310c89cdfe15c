"""The Scheduler contract (`weavelm.testing.scheduler`), run against every registered scheduler plugin, built-in or
installed from outside: one `TestContract_<name>_<config>` class per scheduler and budget configuration.

A scheduler whose `Options` have the built-ins' `max_num_seqs` / `max_num_batched_tokens` runs under a tight and a
roomy configuration; any other runs with its default options (the suite reads its limits from `limits()`).
Scheduler-specific options (`long_prefill_token_threshold`) are tested below the generated classes.
"""

from __future__ import annotations

import pytest

from tests.scheduler_utils import Driver, FakeRunner, make_request, make_scheduler, scheduler_names
from weavelm.testing import component
from weavelm.testing.scheduler import BLOCK_SIZE, SchedulerContract, expected

CONFIGS = {"tight": {"max_num_seqs": 3, "max_num_batched_tokens": 8},
           "roomy": {"max_num_batched_tokens": 64}}

for _name in scheduler_names():
    _fields = component("scheduler", _name).Options.model_fields
    _configs = CONFIGS if {"max_num_seqs", "max_num_batched_tokens"} <= set(_fields) else {"defaults": {}}
    for _config, _options in _configs.items():
        _cls = f"TestContract_{_name}_{_config}"
        globals()[_cls] = type(_cls, (SchedulerContract,), {"scheduler": _name, "options": _options})


@pytest.mark.parametrize("name", scheduler_names())
def test_long_prefill_token_threshold(name):
    sched = make_scheduler(name, block_size=BLOCK_SIZE, max_num_batched_tokens=64, long_prefill_token_threshold=5)
    if getattr(sched.options, "long_prefill_token_threshold", None) != 5:
        pytest.skip(f"{name} has no long_prefill_token_threshold option")
    d = Driver(sched, FakeRunner(BLOCK_SIZE, 64))
    d.add(make_request("a", 23, max_tokens=2))
    sizes = [d.step().num_scheduled_tokens["a"] for _ in range(6)]
    assert sizes == [5, 5, 5, 5, 3, 1]
    assert d.tokens["a"] == expected("a", 23, 2)
