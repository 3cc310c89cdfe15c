"""The registry the contract suites look components up in: one per test process, loaded from the installed entry
points (the allow-list in `WEAVELM_PLUGINS` applies), so a suite tests exactly what an engine would build."""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def registry() -> Any:
    from weavelm.core.registry import Registry

    return Registry.load()


def component(kind: str, name: str) -> Any:
    """The registered class of `kind` called `name` (a PluginError lists what is installed)."""
    return registry().get(kind, name)


def names(kind: str) -> list[str]:
    """Every registered component name of `kind`, sorted."""
    return sorted(registry().names(kind))
