"""EngineConfig: the declarative composition of an engine, validated in two phases.

Phase 1 checks the top level (known keys, scalar fields, cache section). Phase 2 reads each component section's
`name`, looks the plugin up in the registry and validates the rest of the section with that plugin's `Options`.
All problems from both phases are reported together, each with its YAML path.
"""

from __future__ import annotations

import copy
import reprlib
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from weavelm.errors import ConfigError, PluginError
from weavelm.ops.settings import KernelConfig
from weavelm.pooling.config import PoolerConfig

COMPONENT_SECTIONS = {
    "scheduler": ("scheduler", "fcfs"),
    "executor": ("executor", "uniproc"),
    "worker": ("worker", "device"),
    "model_runner": ("model_runner", "paged"),
    "loader": ("loader", "auto"),
    "attention": ("attention", "auto"),
    "quantization": ("quantization", "auto"),
}
# Upper bounds that keep every accepted value buildable: the block pool holds one Python object per block, and the
# runner's persistent batch keeps `max_model_len` token ids per sequence.
MAX_NUM_BLOCKS = 1 << 24
MAX_CPU_KV_CACHE_GIB = 4096.0
MAX_MODEL_LEN = 1 << 24
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
MAX_YAML_DEPTH = 64
MAX_ECHO = 200  # characters of a user value repeated in an error message
MIN_KV_SLOTS = 2  # a prompt must be shorter than max_model_len, which the KV pool caps

SCALAR_FIELDS = ("model", "tokenizer", "dtype", "device", "seed", "max_model_len", "enforce_eager",
                 "async_scheduling", "engine_process", "engine_iteration_timeout_s", "num_threads", "runner")
# Sections that exist only when written: key -> (kind, default plugin)
OPTIONAL_SECTIONS = {"lora": ("lora_manager", "punica"), "speculative": ("proposer", "")}  # "": name required


class CacheConfig(BaseModel):
    """The paged KV cache."""

    model_config = ConfigDict(extra="forbid", strict=True)
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV block.")
    num_blocks: int | None = Field(None, ge=1, le=MAX_NUM_BLOCKS,
                                   description="Fix the pool size; default: sized from memory.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, allow_inf_nan=False,
                                          description="Share of the GPU the engine may use.")
    cpu_kv_cache_gib: float = Field(1.0, gt=0, le=MAX_CPU_KV_CACHE_GIB, allow_inf_nan=False,
                                    description="KV cache size on CPU, in GiB (a finite number).")
    enable_prefix_caching: bool = Field(True, description="Share KV blocks of identical prompt prefixes.")

    @model_validator(mode="after")
    def _holds_a_request(self) -> CacheConfig:
        if self.num_blocks is not None and self.num_blocks * self.block_size < MIN_KV_SLOTS:
            raise ValueError(f"num_blocks x block_size = {self.num_blocks * self.block_size} token slots, but a "
                             f"request needs at least {MIN_KV_SLOTS} (one prompt token and one output token); "
                             f"raise cache.num_blocks or cache.block_size")
        return self


class MultiModalConfig(BaseModel):
    """Limits on multimodal inputs (images), checked in the frontend before a request reaches the core."""

    model_config = ConfigDict(extra="forbid", strict=True)
    limit_mm_per_prompt: dict[str, int] = Field(
        default_factory=lambda: {"image": 999}, description="Most items of each modality in one prompt (vLLM's "
        "name and V1 default, 999), e.g. {image: 1}; a prompt with more is refused.")
    allowed_local_media_path: str = Field(
        "", description="Directory whose files chat `image_url` parts may name as file:// URLs (vLLM's name); "
        "empty: none. Remote (http/https) URLs are never fetched.")
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, le=1 << 31, description="Largest image accepted, in pixels (width x height), checked "
        "before it is decoded.")

    @model_validator(mode="after")
    def _limits_are_counts(self) -> MultiModalConfig:
        bad = {k: v for k, v in self.limit_mm_per_prompt.items() if v < 0}
        if bad:
            raise ValueError(f"limit_mm_per_prompt: counts must be >= 0 (got {bad})")
        return self


class _TopLevel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = Field(None, description="Model directory (config.json + weights) or .gguf file.")
    tokenizer: str | None = Field(None, description="Tokenizer directory; default: beside the model.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="Weights/activations.")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: cuda when available.")
    seed: int = Field(0, ge=INT64_MIN, le=INT64_MAX, description="Seed for random weights and unseeded sampling "
                      "(a 64-bit signed integer).")
    max_model_len: int | None = Field(None, ge=1, le=MAX_MODEL_LEN,
                                      description="Context limit; default: the model's.")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs.")
    async_scheduling: bool | None = Field(None, description="Schedule and launch step N+1 while step N runs on the "
                                          "device, feeding N's sampled tokens to N+1 on the device (vLLM's async "
                                          "scheduling). None: on for CUDA without speculative decoding.")
    engine_process: bool = Field(False, description="Run the engine core (scheduler + executor) in its own "
                                 "process, so tokenizing, detokenizing and streaming in the caller's process overlap "
                                 "the core's steps; requests and outputs cross through ZeroMQ.")
    engine_iteration_timeout_s: float = Field(120.0, ge=0, description="With `engine_process`, how long the "
                                              "frontend waits for any message from a core that holds its requests "
                                              "before declaring it frozen (EngineDeadError naming the process); "
                                              "0: wait forever (vLLM's VLLM_ENGINE_ITERATION_TIMEOUT_S).")
    num_threads: int | None = Field(None, ge=1, le=1024, description="torch CPU threads in each process that "
                                    "runs the model (the runner sets it when it loads); None: one per core not "
                                    "busy now (the 1-minute load average), at most torch's default.")
    runner: Literal["generate", "pooling"] = Field("generate", description="vLLM's `runner`: generate (sample "
                                                   "tokens) or pooling (embed prompts: `LLM.embed`, /v1/embeddings).")
    pooler: PoolerConfig | None = Field(None, description="With runner: pooling, the pooling type and normalization "
                                        "(default: the model's sentence-transformers config, else LAST, normalized).")
    cache: CacheConfig = Field(default_factory=CacheConfig)
    kernels: KernelConfig = Field(default_factory=KernelConfig)
    multimodal: MultiModalConfig = Field(default_factory=MultiModalConfig)
    scheduler: Any = None
    executor: Any = None
    worker: Any = None
    model_runner: Any = None
    loader: Any = None
    attention: Any = None
    lora: Any = None
    speculative: Any = None
    quantization: Any = None


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
    async_scheduling: bool | None = Field(None, description="Overlap scheduling with the device (None: auto).")
    engine_process: bool = Field(False, description="The engine core runs in its own process (SyncMPClient / AsyncMPClient).")
    engine_iteration_timeout_s: float = Field(120.0, description="Frozen-core deadline (0: none).")
    num_threads: int | None = Field(None, description="torch CPU threads per model-running process (None: auto).")
    runner: str = Field("generate", description="generate or pooling (embeddings).")
    pooler: PoolerConfig | None = Field(None, description="The pooler's overrides (runner: pooling only).")
    cache: CacheConfig = Field(default_factory=CacheConfig)
    kernels: KernelConfig = Field(default_factory=KernelConfig, description="Kernel switches (`weavelm.ops`).")
    multimodal: MultiModalConfig = Field(default_factory=MultiModalConfig,
                                         description="Multimodal input limits (images per prompt, size, local files).")
    scheduler: ComponentConfig
    executor: ComponentConfig
    worker: ComponentConfig
    model_runner: ComponentConfig
    loader: ComponentConfig
    attention: ComponentConfig
    lora: ComponentConfig | None = Field(None, description="Multi-LoRA serving; None when `lora:` is absent.")
    speculative: ComponentConfig | None = Field(None, description="Speculative decoding: the proposer and its "
                                                "options (`num_speculative_tokens`, ...); None: off.")
    quantization: ComponentConfig | None = Field(None, description="Weight quantization (None: auto).")

    @classmethod
    def build(cls, raw: dict[str, Any] | None = None, registry: Any = None) -> EngineConfig:
        from weavelm.core.registry import Registry

        raw = copy.deepcopy(raw or {})
        if not isinstance(raw, dict):
            raise ConfigError([("", f"the configuration must be a mapping (got {type(raw).__name__})")])
        registry = registry or Registry.load()
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
        for key, (kind, default) in OPTIONAL_SECTIONS.items():
            if raw.get(key) is not None:
                comp = _validate_section(key, kind, raw[key], registry, errors, default)
                if comp is not None:
                    sections[key] = comp
        if top is not None:
            errors.extend(_runner_conflicts(top, sections))
        if errors:
            raise ConfigError(errors)
        assert top is not None
        fields = {k: getattr(top, k) for k in (*SCALAR_FIELDS, "cache", "kernels", "pooler", "multimodal")}
        return cls(**fields, **sections)

    @classmethod
    def from_yaml(cls, path: str, overrides: dict[str, Any] | None = None,
                  sets: list[str] | None = None) -> EngineConfig:
        return cls.build(merge_overrides(read_yaml(path), overrides, sets))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in SCALAR_FIELDS}
        out["cache"] = self.cache.model_dump()
        out["kernels"] = self.kernels.model_dump()
        out["multimodal"] = self.multimodal.model_dump()
        if self.pooler is not None:
            out["pooler"] = self.pooler.model_dump()
        for key in COMPONENT_SECTIONS:
            comp: ComponentConfig | None = getattr(self, key)
            if comp is None:
                continue
            out[key] = {"name": comp.name, **(comp.options.model_dump() if comp.options is not None else {})}
        for key in OPTIONAL_SECTIONS:
            comp = getattr(self, key)
            if comp is not None:
                out[key] = {"name": comp.name, **comp.options.model_dump()}
        return out


def _runner_conflicts(top: _TopLevel, sections: dict[str, ComponentConfig]) -> list[tuple[str, str]]:
    """What `runner:` cannot be combined with."""
    if top.runner == "generate":
        return [("pooler", "only applies with runner: pooling; set runner: pooling or remove the section")] \
            if top.pooler is not None else []
    if "speculative" in sections:
        return [("speculative", "a pooling engine samples nothing, so it has nothing to speculate; remove the "
                                "section or use runner: generate")]
    return []


def _pydantic_errors(e: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        path = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown option; remove it or check its spelling"
        elif "input" in err and err["type"] != "missing":
            msg = f"{msg} (got {echo(err['input'])})"
        out.append((path, msg))
    return out


_ECHO_REPR = reprlib.Repr()
_ECHO_REPR.maxlevel, _ECHO_REPR.maxstring, _ECHO_REPR.maxother, _ECHO_REPR.maxlong = 3, MAX_ECHO, MAX_ECHO, 60


def echo(value: Any) -> str:
    """A bounded repr of a user-supplied value for an error message (a huge value never becomes a huge message)."""
    text = _ECHO_REPR.repr(value)
    return text if len(text) <= MAX_ECHO else text[:MAX_ECHO - 3] + "..."


def _validate_section(key: str, kind: str, section: Any, registry: Any, errors: list[tuple[str, str]],
                      default: str) -> ComponentConfig | None:
    if isinstance(section, str):
        section = {"name": section}
    if not isinstance(section, dict):
        errors.append((key, f"must be a plugin name or a mapping with `name:` (got {echo(section)})"))
        return None
    section = dict(section)
    name = section.pop("name", default)
    if not isinstance(name, str) or not name:
        errors.append((f"{key}.name", "missing; name the plugin to use, e.g. `name: ...`"))
        return None
    try:
        cls = registry.get(kind, name)
    except PluginError as e:
        errors.append((f"{key}.name", str(e)))
        return None
    try:
        options = cls.Options.model_validate(section, strict=True)  # `true` is no count, "4" no number
    except ValidationError as e:
        errors.extend(_pydantic_errors(e, prefix=key))
        return None
    return ComponentConfig(name=name, options=options)


class RefusedYAML(yaml.MarkedYAMLError):
    """YAML that parses but that engine configs do not accept (aliases, deep nesting); `hint` says what to do."""

    def __init__(self, problem: str, mark: Any, hint: str):
        super().__init__(problem=problem, problem_mark=mark)
        self.hint = hint


class ConfigLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses aliases (`*name`, so no "billion laughs" expansion), nesting deeper than
    MAX_YAML_DEPTH (so no recursion overflow) and a key written twice in one mapping (which would silently keep the
    last value). Engine configs are small; repeat a value instead of aliasing it."""

    def __init__(self, stream: Any):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise RefusedYAML(f"found alias *{event.anchor}", event.start_mark,
                              "anchors and aliases are not allowed in engine configs; write the value out")
        if self._depth >= MAX_YAML_DEPTH:
            raise RefusedYAML(f"nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark,
                              "flatten the value")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: SafeLoader reports it
                    continue
                if first is not key_node.start_mark:
                    raise RefusedYAML(f"duplicate key {echo(key)} (first at line {first.line + 1})",
                                      key_node.start_mark, "write each key once")
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: Any, source: str) -> Any:
    """Parse YAML with `ConfigLoader`; a ConfigError naming `source` (file or `--set` item) and the position."""
    try:
        return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - ConfigLoader is a SafeLoader
    except yaml.YAMLError as e:
        raise ConfigError([("", f"{source}: not valid YAML ({yaml_problem(e)})")]) from e


def yaml_problem(e: yaml.YAMLError) -> str:
    """One line: the problem and where (`found alias *a at line 3, column 5; ...`)."""
    if not isinstance(e, yaml.MarkedYAMLError):
        return echo(str(e))
    problem = e.problem or e.context or type(e).__name__
    mark = e.problem_mark or e.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    hint = f"; {e.hint}" if isinstance(e, RefusedYAML) else ""
    return f"{problem}{where}{hint}"


def read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = load_yaml(f, path) or {}
    except OSError as e:
        raise ConfigError([("", f"cannot read config file {path!r}: {e.strerror}")]) from e
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
            raise ConfigError([(dotted, f"cannot set a key under {part!r}, which is {echo(child)}")])
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
        key = key.strip()
        if not key or not all(key.split(".")):
            raise ConfigError([(echo(item), "--set needs a dotted key before '=', e.g. scheduler.max_num_seqs=8")])
        try:
            value = load_yaml(text, f"--set {echo(item)}")
        except ConfigError as e:
            raise ConfigError([(key, e.errors[0][1])]) from e.__cause__
        set_path(raw, key, value)
    return raw
