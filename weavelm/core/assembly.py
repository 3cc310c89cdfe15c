"""The one assembler: every component of an engine is resolved here, from one per-engine `Registry`.

`EngineCore` calls `Assembly(config, registry)`; the assembly builds the executor (handing it a picklable
`build_worker`), and, through that, each worker (handing it `build_runner`) and each runner (handing it the loader,
the architecture lookup and the attention-backend selection). No component looks up another kind by itself.
Across a process boundary only `WorkerBuilder` travels: it carries the config and the registry's `RegistrySpec`,
and rebuilds the registry from entry points on first use in the child.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from weavelm.core.config import EngineConfig
from weavelm.core.contexts import (ExecutorContext, RunnerContext, SchedulerContext, SchedulerLimits,
                                   WorkerContext)
from weavelm.core.forward import AttentionSpec
from weavelm.core.interfaces import (AttentionBackend, Executor, ModelArchitecture, ModelLoader, ModelRunner,
                                     Scheduler, Worker)
from weavelm.core.registry import Registry, RegistrySpec
from weavelm.ops import settings as kernel_settings


def build_loader(config: EngineConfig, registry: Registry) -> ModelLoader:
    """The configured loader (for `auto`, a selector over every registered loader)."""
    cls = registry.get("loader", config.loader.name)
    return cls.select(config.loader.options, registry.classes("loader"))


def build_lora_manager(config: EngineConfig, registry: Registry) -> Any:
    """The configured LoRAManager, or None when the config has no `lora:` section."""
    if config.lora is None:
        return None
    return registry.get("lora_manager", config.lora.name)(config.lora.options)


class _RegistryHolder:
    """Carries a registry and the engine's loader in process, and the registry's spec across processes (the
    registry and a loader are rebuilt lazily on the other side): one loader per engine per process."""

    def __init__(self, config: EngineConfig, spec: RegistrySpec, registry: Registry | None,
                 loader: ModelLoader | None = None):
        self.config = config
        self.spec = spec
        self._registry = registry
        self._loader = loader

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry.from_spec(self.spec)
        return self._registry

    @property
    def loader(self) -> ModelLoader:
        if self._loader is None:
            self._loader = build_loader(self.config, self.registry)
        return self._loader

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_registry": None, "_loader": None}


class RunnerBuilder(_RegistryHolder):
    """`build_runner(device)` of a WorkerContext."""

    def __init__(self, config: EngineConfig, spec: RegistrySpec, registry: Registry | None, limits: SchedulerLimits,
                 rank: int, world_size: int, loader: ModelLoader | None = None):
        super().__init__(config, spec, registry, loader)
        self.limits, self.rank, self.world_size = limits, rank, world_size

    def __call__(self, device: torch.device) -> ModelRunner:
        registry, config = self.registry, self.config
        kernel_settings.activate(config.kernels)  # process-wide kernel switches, before any layer is built
        context = RunnerContext(config=config, device=device, rank=self.rank, world_size=self.world_size,
                                limits=self.limits, loader=self.loader,
                                model_class=self.model_class, attention_backend=self.attention_backend,
                                lora_manager=self.lora_manager if config.lora is not None else None,
                                build_proposer=self.build_proposer if config.speculative is not None else None,
                                quantization=self.quantization)
        cls = registry.get("model_runner", config.model_runner.name)
        return cls(config.model_runner.options, context)

    def build_proposer(self, context: RunnerContext, block_size: int, load_model: Any) -> Any:
        """The configured speculative-decoding proposer for a runner built with `context`; `load_model(model,
        dtype)` is the runner's model loading, lent to draft-model proposers."""
        from weavelm.core.proposer import ProposerContext

        section = self.config.speculative
        cls = self.registry.get("proposer", section.name)
        return cls(section.options, ProposerContext(runner=context, block_size=block_size, load_model=load_model))

    def lora_manager(self) -> Any:
        return build_lora_manager(self.config, self.registry)

    def model_class(self, hf_config: Any) -> type[ModelArchitecture]:
        from weavelm.errors import ConfigError

        archs = getattr(hf_config, "architectures", None) or []
        if isinstance(archs, str) or not isinstance(archs, (list, tuple)):
            raise ConfigError([("model", f"config.json `architectures` must be a list of strings such as "
                                         f"[\"LlamaForCausalLM\"] (got {archs!r})")])
        if not archs:
            raise ConfigError([("model", f"{self.config.model}: config.json names no `architectures`")])
        from weavelm.core.multimodal import resolve_language_model

        return resolve_language_model(self.registry.find_model(archs[0]), hf_config, self.registry.find_model)

    def attention_backend(self, spec: AttentionSpec) -> AttentionBackend:
        section, registry = self.config.attention, self.registry
        cls = registry.get("attention", section.name)
        return cls.select(section.options, spec, registry.classes("attention"))


    def quantization(self, spec: Any) -> Any:
        from weavelm.core.config import ComponentConfig
        from weavelm.core.quantization import resolve

        section = self.config.quantization or ComponentConfig(name="auto", options=None)
        return resolve(section, self.registry, spec)


class WorkerBuilder(_RegistryHolder):
    """`build_worker(rank, world_size)` of an ExecutorContext; picklable."""

    def __init__(self, config: EngineConfig, spec: RegistrySpec, registry: Registry | None,
                 limits: SchedulerLimits, loader: ModelLoader | None = None):
        super().__init__(config, spec, registry, loader)
        self.limits = limits

    def __call__(self, rank: int, world_size: int, distributed_init_method: str | None = None) -> Worker:
        config = self.config
        runner_builder = RunnerBuilder(config, self.spec, self._registry, self.limits, rank, world_size,
                                       self._loader)
        context = WorkerContext(config=config, rank=rank, world_size=world_size, build_runner=runner_builder,
                                distributed_init_method=distributed_init_method)
        cls = self.registry.get("worker", config.worker.name)
        return cls(config.worker.options, context)


class Assembly:
    """Resolves an engine's scheduler and executor (and, through the executor, everything below it). `loader`: the
    engine's loader when the frontend already built one in this process (its runner reuses it, so a file's header
    is parsed once); None: built where the runner is."""

    def __init__(self, config: EngineConfig, registry: Registry, loader: ModelLoader | None = None):
        self.config = config
        self.registry = registry
        self.loader = loader
        self.scheduler_cls: type[Scheduler] = registry.get("scheduler", config.scheduler.name)
        self.limits = self.scheduler_cls.limits(config.scheduler.options)

    def build_executor(self) -> Executor:
        config = self.config
        builder = WorkerBuilder(config, self.registry.spec, self.registry, self.limits, self.loader)
        cls = self.registry.get("executor", config.executor.name)
        return cls(config.executor.options, ExecutorContext(config=config, build_worker=builder))

    def build_scheduler(self, context: SchedulerContext) -> Scheduler:
        spec = self.config.speculative
        if spec is not None:
            k = spec.options.num_speculative_tokens
            uses_kv = self.registry.get("proposer", spec.name).uses_kv_cache
            context = dataclasses.replace(context, num_speculative_tokens=k, num_lookahead_tokens=k if uses_kv else 0)
        return self.scheduler_cls(self.config.scheduler.options, context)
