"""Plugin discovery and component lookup.

Discovery iterates `importlib.metadata.entry_points(group="weavelm")`, imports each entry, and registers the module
with pluggy; each plugin's `weavelm_register(registry)` then adds its components. A plugin that fails to import is
recorded with its error and distribution: the engine fails only when that plugin is selected.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import logging
import os
import traceback
from dataclasses import dataclass
from typing import Any

import pluggy

from weavelm.core import hookspecs
from weavelm.core.interfaces import COMPONENT_KINDS
from weavelm.errors import PluginError

logger = logging.getLogger("weavelm.registry")
ENTRY_POINT_GROUP = "weavelm"
OWN_DISTRIBUTION = "weavelm"


@dataclass
class PluginRecord:
    """One entry point: where it came from and whether it loaded."""

    name: str
    value: str
    distribution: str
    version: str
    error: str | None = None


@dataclass
class ComponentRecord:
    kind: str
    name: str
    cls: Any
    plugin: str
    distribution: str
    version: str


class Registry:
    """Components by kind and name, plus the pluggy manager whose event hooks observers implement."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginRecord] = {}
        self.components: dict[str, dict[str, ComponentRecord]] = {k: {} for k in COMPONENT_KINDS}
        self.clashes: dict[tuple[str, str], list[str]] = {}
        self._current: PluginRecord | None = None

    # -- registration -------------------------------------------------------------------------------------
    def add(self, kind: str, name: str, cls: Any) -> None:
        """Called from a plugin's `weavelm_register` hook."""
        if kind not in self.components:
            raise PluginError(f"unknown component kind {kind!r}; kinds are {', '.join(COMPONENT_KINDS)}")
        rec = self._current or PluginRecord("<direct>", "", "<direct>", "")
        existing = self.components[kind].get(name)
        if existing is not None and existing.cls is not cls:
            self.clashes.setdefault((kind, name), [existing.distribution]).append(rec.distribution)
            return
        self.components[kind][name] = ComponentRecord(kind, name, cls, rec.name, rec.distribution, rec.version)

    def register_plugin(self, plugin: Any, record: PluginRecord) -> None:
        """Register one plugin object (module) and run its `weavelm_register`."""
        self.plugins[record.name] = record
        if self.pm.is_registered(plugin):
            return
        self.pm.register(plugin, name=f"{record.distribution}:{record.name}")
        self.pm.check_pending()
        impl = getattr(plugin, "weavelm_register", None)
        if impl is not None:
            self._current = record
            try:
                impl(registry=self)
            finally:
                self._current = None

    def load_entry_points(self) -> None:
        allow = os.environ.get("WEAVELM_PLUGINS")
        allowed = {a.strip() for a in allow.split(",") if a.strip()} if allow else None
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else "<unknown>"
            version = ep.dist.version if ep.dist is not None else ""
            if allowed is not None and dist != OWN_DISTRIBUTION and ep.name not in allowed:
                continue
            if ep.name in self.plugins and self.plugins[ep.name].error is None:
                continue
            record = PluginRecord(ep.name, ep.value, dist, version)
            try:
                module = ep.load()
                self.register_plugin(module, record)
            except Exception as e:  # a broken plugin must not break the others
                record.error = f"{type(e).__name__}: {e}"
                self.plugins[ep.name] = record
                logger.debug("plugin %s failed to load:\n%s", ep.name, traceback.format_exc())

    # -- lookup -------------------------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def get(self, kind: str, name: str) -> Any:
        """The component class of `kind` called `name`, or a PluginError saying what is available."""
        if kind not in self.components:
            raise PluginError(f"unknown component kind {kind!r}; kinds are {', '.join(COMPONENT_KINDS)}")
        if (kind, name) in self.clashes:
            dists = " and ".join(self.clashes[(kind, name)])
            raise PluginError(f"{kind} {name!r} is claimed by two distributions ({dists}); uninstall one or "
                              f"set WEAVELM_PLUGINS to the one you want")
        rec = self.components[kind].get(name)
        if rec is not None:
            return rec.cls
        failed = [p for p in self.plugins.values() if p.error and name in (p.name, p.value.split(".")[-1])]
        if failed:
            p = failed[0]
            raise PluginError(f"{kind} {name!r}: its plugin {p.name!r} from {p.distribution} failed to load "
                              f"({p.error}); fix or reinstall that distribution")
        raise PluginError(self.unknown_message(kind, name))

    def unknown_message(self, kind: str, name: str) -> str:
        available = self.names(kind)
        closest = difflib.get_close_matches(name, available, n=len(available), cutoff=0.0)
        return f"unknown {kind} plugin {name!r}; installed: {', '.join(closest) or '(none)'}"

    def find_model(self, hf_architecture: str) -> Any:
        for rec in self.components["model"].values():
            if hf_architecture in getattr(rec.cls, "hf_architectures", ()):
                return rec.cls
        served = sorted(a for r in self.components["model"].values() for a in r.cls.hf_architectures)
        raise PluginError(f"model architecture {hf_architecture!r} is not supported; supported: "
                          f"{', '.join(served)}")

    @property
    def hook(self):
        return self.pm.hook


_default: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _default
    if _default is None:
        reg = Registry()
        reg.load_entry_points()
        _default = reg
    return _default


def reset_registry() -> None:
    """Forget the loaded registry (tests that install plugins at run time)."""
    global _default
    _default = None
