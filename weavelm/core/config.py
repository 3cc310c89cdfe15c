"""EngineConfig: the declarative composition of an engine, validated in two phases.

Phase 1 checks the top level (known keys, scalar fields, cache section). Phase 2 reads each component section's
`name`, looks the plugin up in the registry and validates the rest of the section with that plugin's `Options`.
All problems from both phases are reported together, each with its YAML path.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from weavelm.errors import ConfigError, PluginError

COMPONENT_SECTIONS = {
    "scheduler": ("scheduler", "fcfs"),
    "executor": ("executor", "uniproc"),
    "worker": ("worker", "worker"),
    "model_runner": ("model_runner", "model_runner"),
    "loader": ("loader", "auto"),
    "attention": ("attention", "auto"),
}
AUTO_ATTENTION = "auto"  # resolved by the runner: flash_attn > triton > torch_ref on CUDA, torch_ref on CPU


class CacheConfig(BaseModel):
    """The paged KV cache."""

    model_config = ConfigDict(extra="forbid")
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV block.")
    num_blocks: int | None = Field(None, ge=1, description="Fix the pool size; default: sized from memory.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of the GPU the engine may use.")
    cpu_kv_cache_gib: float = Field(1.0, gt=0, description="KV cache size on CPU, in GiB.")
    enable_prefix_caching: bool = Field(True, description="Share KV blocks of identical prompt prefixes.")


class _TopLevel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="Model directory (config.json + weights) or .gguf file.")
    tokenizer: str | None = Field(None, description="Tokenizer directory; default: beside the model.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="Weights/activations.")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: cuda when available.")
    seed: int = Field(0, description="Seed for random weights and unseeded sampling.")
    max_model_len: int | None = Field(None, ge=1, description="Context limit; default: the model's.")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs.")
    cache: CacheConfig = Field(default_factory=CacheConfig)
    lora: dict[str, Any] | None = Field(None, description="Reserved for multi-LoRA serving.")
    scheduler: Any = None
    executor: Any = None
    worker: Any = None
    model_runner: Any = None
    loader: Any = None
    attention: Any = None


class ComponentConfig(BaseModel):
    """A chosen plugin and its validated options."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    name: str
    options: Any = None

    def __getattr__(self, item: str) -> Any:  # convenience: config.scheduler.max_num_seqs
        opts = self.__dict__.get("options")
        if opts is not None and item in type(opts).model_fields:
            return getattr(opts, item)
        raise AttributeError(item)


class EngineConfig(BaseModel):
    """The validated engine composition. Build it with `EngineConfig.build`, `from_yaml` or `LLM(...)` kwargs."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=False)
    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    enforce_eager: bool = False
    cache: CacheConfig = Field(default_factory=CacheConfig)
    lora: dict[str, Any] | None = None
    scheduler: ComponentConfig
    executor: ComponentConfig
    worker: ComponentConfig
    model_runner: ComponentConfig
    loader: ComponentConfig
    attention: ComponentConfig
    raw: dict[str, Any] = Field(default_factory=dict, description="The merged input, for reproducibility.")

    @classmethod
    def build(cls, raw: dict[str, Any] | None = None, registry: Any = None) -> EngineConfig:
        from weavelm.core.registry import get_registry

        raw = copy.deepcopy(raw or {})
        if not isinstance(raw, dict):
            raise ConfigError([("", f"the configuration must be a mapping (got {type(raw).__name__})")])
        registry = registry or get_registry()
        errors: list[tuple[str, str]] = []
        top = None
        try:
            top = _TopLevel.model_validate(raw)
        except ValidationError as e:
            errors.extend(_pydantic_errors(e))
        sections: dict[str, ComponentConfig] = {}
        for key, (kind, default) in COMPONENT_SECTIONS.items():
            section = raw.get(key) if raw.get(key) is not None else default
            comp = _validate_section(key, kind, section, registry, errors, default)
            if comp is not None:
                sections[key] = comp
        if errors:
            raise ConfigError(errors)
        assert top is not None
        fields = {k: getattr(top, k) for k in ("model", "tokenizer", "dtype", "device", "seed", "max_model_len",
                                                "enforce_eager", "cache", "lora")}
        return cls(**fields, **sections, raw=raw)

    @classmethod
    def from_yaml(cls, path: str, overrides: dict[str, Any] | None = None,
                  sets: list[str] | None = None) -> EngineConfig:
        return cls.build(merge_overrides(read_yaml(path), overrides, sets))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in ("model", "tokenizer", "dtype", "device", "seed",
                                                              "max_model_len", "enforce_eager", "lora")}
        out["cache"] = self.cache.model_dump()
        for key in COMPONENT_SECTIONS:
            comp: ComponentConfig = getattr(self, key)
            out[key] = {"name": comp.name, **(comp.options.model_dump() if comp.options is not None else {})}
        return out


def _pydantic_errors(e: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        path = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown option; remove it or check its spelling"
        elif "input" in err and err["type"] != "missing":
            msg = f"{msg} (got {err['input']!r})"
        out.append((path, msg))
    return out


def _validate_section(key: str, kind: str, section: Any, registry: Any, errors: list[tuple[str, str]],
                      default: str) -> ComponentConfig | None:
    if isinstance(section, str):
        section = {"name": section}
    if not isinstance(section, dict):
        errors.append((key, f"must be a plugin name or a mapping with `name:` (got {section!r})"))
        return None
    section = dict(section)
    name = section.pop("name", default)
    if not isinstance(name, str) or not name:
        errors.append((f"{key}.name", "missing; name the plugin to use, e.g. `name: ...`"))
        return None
    if kind == "attention" and name == AUTO_ATTENTION:
        if section:
            errors.append((key, f"`auto` takes no options (got {sorted(section)})"))
        return ComponentConfig(name=name, options=None)
    try:
        cls = registry.get(kind, name)
    except PluginError as e:
        errors.append((f"{key}.name", str(e)))
        return None
    try:
        options = cls.Options.model_validate(section)
    except ValidationError as e:
        errors.extend(_pydantic_errors(e, prefix=key))
        return None
    return ComponentConfig(name=name, options=options)


def read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError([("", f"cannot read config file {path!r}: {e.strerror}")]) from e
    except yaml.YAMLError as e:
        raise ConfigError([("", f"{path}: not valid YAML ({e})")]) from e
    if not isinstance(data, dict):
        raise ConfigError([("", f"{path}: must hold a mapping at the top level")])
    return data


def set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict; a bare-string component section becomes `{name: ...}` first."""
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str):
            child = {"name": child}
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError([(dotted, f"cannot set a key under {part!r}, which is {child!r}")])
        node[part] = child
        node = child
    node[parts[-1]] = value


def merge_overrides(raw: dict[str, Any], overrides: dict[str, Any] | None = None,
                    sets: list[str] | None = None) -> dict[str, Any]:
    """Apply keyword overrides (nested dicts merge into sections) and `--set a.b=c` strings to a raw config."""
    raw = copy.deepcopy(raw)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if isinstance(value, dict):
            base = raw.get(key)
            base = {"name": base} if isinstance(base, str) else dict(base or {})
            base.update(value)
            raw[key] = base
        else:
            raw[key] = value
    for item in sets or []:
        if "=" not in item:
            raise ConfigError([(item, "--set takes KEY=VALUE, e.g. --set scheduler.max_num_seqs=8")])
        key, text = item.split("=", 1)
        set_path(raw, key.strip(), yaml.safe_load(text))
    return raw
