"""Plugin discovery and component lookup. One `Registry` per engine: nothing here is process-global.

`Registry.load()` iterates `importlib.metadata.entry_points(group="weavelm")`, imports each entry and registers the
module with pluggy. `weavelm_register` is a historic hook: it is called on each plugin as it registers, so pluggy's
`tryfirst`/`trylast` and spec checks apply. A plugin that fails to import, or was written for an incompatible
plugin API (`WEAVELM_API_VERSION` major differs from `API_VERSION`), is recorded with its error and distribution:
the engine fails only when that plugin is selected. A registry is rebuilt in a child process from its picklable
`RegistrySpec`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as md
import logging
import os
import traceback
from dataclasses import dataclass
from typing import Any

import pluggy

from weavelm.core import hookspecs
from weavelm.core.interfaces import API_VERSION, COMPONENT_KINDS
from weavelm.errors import PluginError

logger = logging.getLogger("weavelm.registry")
ENTRY_POINT_GROUP = "weavelm"
OWN_DISTRIBUTION = "weavelm"
ALLOW_ENV = "WEAVELM_PLUGINS"


@dataclass
class PluginRecord:
    """One plugin (entry point or directly registered module): where it came from and whether it loaded."""

    name: str
    value: str
    distribution: str
    version: str
    error: str | None = None
    api_version: str = ""  # the plugin API it declares (`WEAVELM_API_VERSION`); "" when undeclared


@dataclass
class ComponentRecord:
    kind: str
    name: str
    cls: Any
    plugin: str
    distribution: str
    version: str


@dataclass(frozen=True)
class RegistrySpec:
    """Picklable recipe of a registry: the outside-plugin allow-list (None: all) and modules registered directly
    (by import path), so a worker process rebuilds the same registry with `Registry.from_spec`."""

    allow: tuple[str, ...] | None = None
    modules: tuple[str, ...] = ()

    @classmethod
    def from_env(cls) -> RegistrySpec:
        allow = os.environ.get(ALLOW_ENV)
        return cls(tuple(a.strip() for a in allow.split(",") if a.strip()) if allow else None)


def api_incompatibility(declared: str) -> str | None:
    """Why a plugin declaring plugin API `declared` cannot load here, or None."""
    try:
        major = int(str(declared).split(".")[0])
    except ValueError:
        return f"declares WEAVELM_API_VERSION={declared!r}, which is not MAJOR.MINOR"
    ours = int(API_VERSION.split(".")[0])
    if major != ours:
        return (f"was written for weavelm plugin API {declared}, but this weavelm has API {API_VERSION}; "
                f"install a release of the plugin made for API {ours}.x")
    return None


class Registry:
    """Components by kind and name, plus the pluggy manager whose event hooks observers implement."""

    def __init__(self, spec: RegistrySpec | None = None) -> None:
        self.spec = spec or RegistrySpec.from_env()
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginRecord] = {}
        self.components: dict[str, dict[str, ComponentRecord]] = {k: {} for k in COMPONENT_KINDS}
        self.aliases: dict[tuple[str, str], str] = {}
        self.clashes: dict[tuple[str, str], list[str]] = {}
        self._current: PluginRecord | None = None
        self.pm.hook.weavelm_register.call_historic(kwargs={"registry": self})

    @classmethod
    def from_spec(cls, spec: RegistrySpec) -> Registry:
        """Entry points (filtered by `spec.allow`) plus `spec.modules`, registered in that order."""
        registry = cls(spec)
        registry.load_entry_points()
        for module_path in spec.modules:
            registry.register_module(module_path)
        return registry

    @classmethod
    def load(cls, spec: RegistrySpec | None = None) -> Registry:
        """A fresh registry of the installed plugins (allow-list from `WEAVELM_PLUGINS` unless `spec` says)."""
        return cls.from_spec(spec or RegistrySpec.from_env())

    # -- registration -------------------------------------------------------------------------------------
    def add(self, kind: str, name: str, cls: Any, aliases: tuple[str, ...] = ()) -> None:
        """Called from a plugin's `weavelm_register` hook. `aliases` are older names that keep working."""
        if kind not in self.components:
            raise PluginError(f"unknown component kind {kind!r}; kinds are {', '.join(COMPONENT_KINDS)}")
        rec = self._current or PluginRecord("<direct>", "", "<direct>", "")
        existing = self.components[kind].get(name)
        if existing is not None and existing.cls is not cls:
            self.clashes.setdefault((kind, name), [existing.distribution]).append(rec.distribution)
            return
        self.components[kind][name] = ComponentRecord(kind, name, cls, rec.name, rec.distribution, rec.version)
        for alias in aliases:
            self.aliases[(kind, alias)] = name

    def register_plugin(self, plugin: Any, record: PluginRecord) -> None:
        """Register one plugin object (module); the historic `weavelm_register` runs on it at once."""
        declared = getattr(plugin, "WEAVELM_API_VERSION", None)
        record.api_version = API_VERSION if record.distribution == OWN_DISTRIBUTION else str(declared or "")
        if declared is not None and record.distribution != OWN_DISTRIBUTION:
            why = api_incompatibility(str(declared))
            if why:
                raise PluginError(f"plugin {record.name!r} from {record.distribution} {why}")
        self.plugins[record.name] = record
        if self.pm.is_registered(plugin):
            return
        self._current = record
        try:
            self.pm.register(plugin, name=f"{record.distribution}:{record.name}")
            self.pm.check_pending()
        finally:
            self._current = None

    def register_module(self, module_path: str, name: str | None = None) -> None:
        """Register an importable module as a plugin directly (tests, embedding apps). It is recorded in
        `spec.modules`, so a worker process's registry gets it too."""
        module = importlib.import_module(module_path)
        self.register_plugin(module, PluginRecord(name or module_path, module_path, "<direct>", ""))
        if module_path not in self.spec.modules:
            self.spec = RegistrySpec(self.spec.allow, self.spec.modules + (module_path,))

    def load_entry_points(self) -> None:
        allowed = set(self.spec.allow) if self.spec.allow is not None else None
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else "<unknown>"
            version = ep.dist.version if ep.dist is not None else ""
            if allowed is not None and dist != OWN_DISTRIBUTION and ep.name not in allowed:
                continue
            if ep.name in self.plugins and self.plugins[ep.name].error is None:
                continue
            record = PluginRecord(ep.name, ep.value, dist, version)
            try:
                self.register_plugin(ep.load(), record)
            except Exception as e:  # a broken plugin must not break the others
                record.error = str(e) if isinstance(e, PluginError) else f"{type(e).__name__}: {e}"
                self.plugins[ep.name] = record
                logger.debug("plugin %s failed to load:\n%s", ep.name, traceback.format_exc())

    # -- lookup -------------------------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def classes(self, kind: str) -> dict[str, Any]:
        """Every registered component class of `kind`, by name (what `auto` selectors choose among)."""
        return {name: rec.cls for name, rec in sorted(self.components[kind].items())}

    def get(self, kind: str, name: str) -> Any:
        """The component class of `kind` called `name`, or a PluginError saying what is available."""
        if kind not in self.components:
            raise PluginError(f"unknown component kind {kind!r}; kinds are {', '.join(COMPONENT_KINDS)}")
        if (kind, name) in self.clashes:
            dists = " and ".join(self.clashes[(kind, name)])
            raise PluginError(f"{kind} {name!r} is claimed by two distributions ({dists}); uninstall one or "
                              f"set WEAVELM_PLUGINS to the one you want")
        rec = self.components[kind].get(name) or self.components[kind].get(self.aliases.get((kind, name), ""))
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
        if not isinstance(hf_architecture, str):
            raise PluginError(f"config.json `architectures` must be a list of strings (got an entry "
                              f"{hf_architecture!r})")
        for rec in self.components["model"].values():
            if hf_architecture in getattr(rec.cls, "hf_architectures", ()):
                return rec.cls
        served = sorted(a for r in self.components["model"].values() for a in r.cls.hf_architectures)
        raise PluginError(f"model architecture {hf_architecture!r} is not supported; supported: "
                          f"{', '.join(served)}")

    @property
    def hook(self):
        return self.pm.hook


