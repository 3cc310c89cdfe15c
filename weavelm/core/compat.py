"""vLLM's flat engine arguments (`LLM(model, max_num_seqs=64, gpu_memory_utilization=0.8, ...)`, `--max-num-seqs`)
mapped onto the sections they belong to, so vLLM code ports by changing the import.

`apply_vllm_aliases` runs on the keyword overrides (or CLI flags) before they are merged into the config file and
`EngineConfig.build` validates the result. Each alias lands in its section (`max_num_seqs` ->
`scheduler.max_num_seqs`), overriding the file like any keyword; a value the chosen plugin does not take, or a flat
name that only a section knows, is an error naming the section and the fix. An alias that disagrees with the same
option given in its section in the same call is an error.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from weavelm.core.config import COMPONENT_SECTIONS, CacheConfig, EngineConfig, MultiModalConfig, echo
from weavelm.core.vllm_args import take_default_only
from weavelm.errors import ConfigError, PluginError

logger = logging.getLogger("weavelm.compat")

# vLLM name -> (section, option)
ALIASES: dict[str, tuple[str, str]] = {
    "tensor_parallel_size": ("executor", "tensor_parallel_size"),
    "gpu_memory_utilization": ("cache", "gpu_memory_utilization"),
    "block_size": ("cache", "block_size"),
    "enable_prefix_caching": ("cache", "enable_prefix_caching"),
    "num_gpu_blocks_override": ("cache", "num_blocks"),
    "max_num_seqs": ("scheduler", "max_num_seqs"),
    "max_num_batched_tokens": ("scheduler", "max_num_batched_tokens"),
    "enable_chunked_prefill": ("scheduler", "enable_chunked_prefill"),
    "long_prefill_token_threshold": ("scheduler", "long_prefill_token_threshold"),
    "max_loras": ("lora", "max_loras"),
    "max_lora_rank": ("lora", "max_lora_rank"),
    "max_cpu_loras": ("lora", "max_cpu_loras"),
    "limit_mm_per_prompt": ("multimodal", "limit_mm_per_prompt"),
    "allowed_local_media_path": ("multimodal", "allowed_local_media_path"),
}
EXECUTOR_BACKENDS = {"mp": "multiproc", "uni": "uniproc", "ray": "ray"}
DTYPES = {"half": "float16", "float": "float32"}
IGNORED = {  # accepted so ported code runs; each logs why it has no effect
    "disable_log_stats": "weavelm reports stats through the weavelm_step_finished hook",
    "swap_space": "weavelm recomputes preempted requests instead of swapping their KV blocks to the CPU",
}
MULTI_WORKER_EXECUTOR = "multiproc"
# vLLM names whose value names a plugin of a section: load_format="safetensors" -> loader: {name: safetensors}
PLUGIN_CHOICES = {"load_format": "loader", "scheduling_policy": "scheduler", "quantization": "quantization"}


def apply_vllm_aliases(raw: dict[str, Any], registry: Any = None, base: dict[str, Any] | None = None
                       ) -> dict[str, Any]:
    """A copy of the overrides `raw` with vLLM's flat arguments moved into their sections. `base` is the config
    they will be merged into (to know which plugins are chosen); `registry` lets it check what those plugins
    accept. Raises ConfigError listing every problem, each with its path. None values are dropped (unset)."""
    raw = {k: v for k, v in copy.deepcopy(raw).items() if v is not None}
    base = base or {}
    errors: list[tuple[str, str]] = []
    _special_cases(raw, base, registry, errors)
    for flat, (section, option) in ALIASES.items():
        if flat in raw:
            _move(raw, base, flat, section, option, registry, errors)
    _misplaced_options(raw, base, registry, errors)
    if errors:
        raise ConfigError(errors)
    return raw


def _special_cases(raw: dict[str, Any], base: dict[str, Any], registry: Any, errors: list[tuple[str, str]]) -> None:
    if "trust_remote_code" in raw:
        value = raw.pop("trust_remote_code")
        if value not in (False, None):
            errors.append(("trust_remote_code", "weavelm never runs code shipped with a model (trust_remote_code=True "
                           "is unsupported); architectures come from built-in or installed model plugins. Remove "
                           "trust_remote_code=True"))
    for name, why in IGNORED.items():
        if name in raw:
            raw.pop(name)
            logger.debug("%s is ignored: %s", name, why)  # vLLM defaults pass silently
    take_default_only(raw, errors)
    for flat, section in PLUGIN_CHOICES.items():
        if flat in raw:
            _choose_plugin(raw, flat, section, registry, errors)
    if raw.get("dtype") in DTYPES:
        raw["dtype"] = DTYPES[raw["dtype"]]
    _lora_flags(raw, errors)
    _runner_flags(raw, errors)
    if raw.get("pipeline_parallel_size") in (1, None) and "pipeline_parallel_size" in raw:
        raw.pop("pipeline_parallel_size")
    if "distributed_executor_backend" in raw:
        backend = raw.pop("distributed_executor_backend")
        name = EXECUTOR_BACKENDS.get(backend, backend) if isinstance(backend, str) else backend
        current = _section(raw, "executor")
        if current.get("name", name) != name:
            errors.append(("distributed_executor_backend", f"{echo(backend)} conflicts with executor.name "
                           f"{echo(current.get('name'))}; give one of them"))
        else:
            current["name"] = name
            raw["executor"] = current
    if "speculative_config" in raw:
        _speculative_config(raw, errors)
    tp = raw.get("tensor_parallel_size")
    executor = _section(raw, "executor")
    if tp == 1 and _chosen(raw, base, "executor") == "uniproc":
        raw.pop("tensor_parallel_size")
    elif (isinstance(tp, int) and not isinstance(tp, bool) and tp > 1 and "name" not in executor
          and "name" not in _section(base, "executor")):
        if registry is None or MULTI_WORKER_EXECUTOR in registry.names("executor"):
            executor["name"] = MULTI_WORKER_EXECUTOR  # vLLM too picks its multiprocessing backend for TP > 1
            raw["executor"] = executor


TASKS = {"auto": None, "generate": "generate", "embed": "pooling", "embedding": "pooling"}  # vLLM's older `task`


def _runner_flags(raw: dict[str, Any], errors: list[tuple[str, str]]) -> None:
    """vLLM's `runner="auto"`, its older `task="embed"` and `pooler_config=` / `override_pooler_config=`."""
    if raw.get("runner") == "auto":
        raw.pop("runner")
    if "task" in raw:
        task = raw.pop("task")
        runner = TASKS.get(task, "") if isinstance(task, str) else ""
        if runner == "":
            errors.append(("task", f"{echo(task)} is not supported; weavelm runs task 'generate' or 'embed' "
                                   f"(runner='generate' or runner='pooling')"))
        elif runner is not None and raw.setdefault("runner", runner) != runner:
            errors.append(("task", f"{echo(task)} conflicts with runner={echo(raw['runner'])}; give one of them"))
    for name in ("pooler_config", "override_pooler_config"):
        if name in raw:
            value = raw.pop(name)
            if hasattr(value, "model_dump"):
                value = value.model_dump(exclude_none=True)
            elif not isinstance(value, dict):  # vLLM's PoolerConfig dataclass: its two fields weavelm takes
                value = {k: getattr(value, k) for k in ("pooling_type", "normalize") if getattr(value, k, None)
                         is not None}
            raw["pooler"] = {**_section(raw, "pooler"), **value}


def _lora_flags(raw: dict[str, Any], errors: list[tuple[str, str]]) -> None:
    """`enable_lora=True` opens the `lora:` section; `lora_modules=["name=path", ...]` (vLLM's serve flag) fills
    `lora.adapters`."""
    if "enable_lora" in raw and raw.pop("enable_lora"):
        raw["lora"] = _section(raw, "lora")
    if "lora_modules" not in raw:
        return
    modules = raw.pop("lora_modules")
    lora = _section(raw, "lora")
    adapters = dict(lora.get("adapters") or {})
    for item in [modules] if isinstance(modules, str) else list(modules):
        name, sep, path = str(item).partition("=")
        if not (name and sep and path):
            errors.append(("lora_modules", f"expects NAME=PATH items, a PEFT adapter directory each (got "
                                           f"{echo(item)})"))
            continue
        adapters[name] = path
    lora["adapters"] = adapters
    raw["lora"] = lora


def _choose_plugin(raw: dict[str, Any], flat: str, section: str, registry: Any,
                   errors: list[tuple[str, str]]) -> None:
    """`load_format` / `scheduling_policy` / `quantization` (a plugin name as a string) -> `section: {name: ...}`;
    a name no installed plugin has is unsupported. `quantization` given as a section (a dict) is left as it is."""
    value = raw.get(flat) if flat == section else raw.pop(flat)
    if flat == section and not isinstance(value, str):
        return  # the section itself, validated by EngineConfig.build
    kind = COMPONENT_SECTIONS[section][0]
    names = registry.names(kind) if registry is not None else None
    if not isinstance(value, str) or (names is not None and value not in names):
        errors.append((flat, f"{echo(value)} is unsupported: weavelm's {section} plugins are "
                             f"{', '.join(names or [])}"))
        raw.pop(flat, None)
        return
    current = _section(raw, section) if flat != section else {}
    if current.get("name", value) != value:
        errors.append((flat, f"{echo(value)} conflicts with {section}.name {echo(current['name'])}; give one"))
        return
    current["name"] = value
    raw[section] = current


def _speculative_config(raw: dict[str, Any], errors: list[tuple[str, str]]) -> None:
    """vLLM's `speculative_config={"method": "ngram", ...}` or `{"model": draft, ...}` -> the `speculative:`
    section (`method` names the proposer; without one, a `model` means `draft_model`)."""
    value = raw.pop("speculative_config")
    if not isinstance(value, dict):
        errors.append(("speculative_config", f"must be a dict such as {{'method': 'ngram', "
                                             f"'num_speculative_tokens': 4}} (got {echo(value)})"))
        return
    if raw.get("speculative") is not None:
        errors.append(("speculative_config", "given together with `speculative`; give one of them"))
        return
    section = dict(value)
    method = section.pop("method", None)
    section["name"] = method if method is not None else ("draft_model" if "model" in section else None)
    if section["name"] is None:
        errors.append(("speculative_config", "needs a `method` (e.g. 'ngram') or a draft `model`"))
        return
    raw["speculative"] = section


def _section(raw: dict[str, Any], section: str) -> dict[str, Any]:
    value = raw.get(section)
    if isinstance(value, str):
        return {"name": value}
    return dict(value) if isinstance(value, dict) else {}


def _chosen(raw: dict[str, Any], base: dict[str, Any], section: str) -> Any:
    """The plugin a section will name once the overrides are merged into the base."""
    default = COMPONENT_SECTIONS[section][1]
    return _section(raw, section).get("name", _section(base, section).get("name", default))


def _plugin_fields(raw: dict[str, Any], base: dict[str, Any], section: str, registry: Any
                   ) -> tuple[str, set[str]] | None:
    """(plugin name, its option names) for a component section, None when unknown."""
    if section == "cache":
        return "cache", set(CacheConfig.model_fields)
    if section == "multimodal":
        return "multimodal", set(MultiModalConfig.model_fields)
    if registry is None or section not in COMPONENT_SECTIONS:
        return None
    kind, _ = COMPONENT_SECTIONS[section]
    name = _chosen(raw, base, section)
    try:
        cls = registry.get(kind, name)
    except (PluginError, TypeError):
        return None  # EngineConfig.build reports the unknown plugin
    return name, set(cls.Options.model_fields)


def _move(raw: dict[str, Any], base: dict[str, Any], flat: str, section: str, option: str, registry: Any,
          errors: list[tuple[str, str]]) -> None:
    value = raw.pop(flat)
    target = raw.get(section)
    if target is not None and not isinstance(target, (dict, str)):
        return  # EngineConfig.build reports the malformed section
    target = _section(raw, section)
    if option in target and target[option] != value:
        errors.append((flat, f"given as {echo(value)} but {section}.{option} is {echo(target[option])}; give one"))
        return
    known = _plugin_fields(raw, base, section, registry)
    if known is not None and option not in known[1]:
        errors.append((f"{section}.{option}", _not_taken(section, known[0], option, value)))
        return
    target[option] = value
    raw[section] = target


def _not_taken(section: str, plugin: str, option: str, value: Any) -> str:
    if section == "executor" and option == "tensor_parallel_size":
        return (f"the {plugin} executor runs one worker; use executor: {{name: {MULTI_WORKER_EXECUTOR}, "
                f"tensor_parallel_size: {echo(value)}}}")
    return (f"the {plugin} {section} does not take `{option}`; choose a {section} that does, or remove "
            f"{option}={echo(value)}")


def _misplaced_options(raw: dict[str, Any], base: dict[str, Any], registry: Any,
                       errors: list[tuple[str, str]]) -> None:
    """A flat name that is no top-level field but an option of a chosen section: say where it lives."""
    top = set(EngineConfig.model_fields) - {"raw"} | {"lora"}
    for key in [k for k in raw if isinstance(k, str) and k not in top]:
        for section in ("cache", *COMPONENT_SECTIONS):
            known = _plugin_fields(raw, base, section, registry)
            if known is not None and key in known[1]:
                errors.append((key, f"is an option of the {section} section ({known[0]}), not a top-level one; "
                               f"write {section}: {{{key}: {echo(raw[key])}}} or --set {section}.{key}=..."))
                break
