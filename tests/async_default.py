"""A pytest plugin for whole-suite runs under async scheduling on the CPU (`pytest -p tests.async_default ...`):
every engine whose config leaves `async_scheduling` unset runs with it on, as CUDA engines do by default."""

from __future__ import annotations

from weavelm.core import config as engine_config


def pytest_configure(config) -> None:
    engine_config._TopLevel.model_fields["async_scheduling"].default = True
    engine_config._TopLevel.model_rebuild(force=True)
