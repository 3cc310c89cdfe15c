"""The small typed contexts the assembler (`core/assembly.py`) hands each component it builds.

No component looks another up: what a stage needs from the rest of the engine arrives here. Contexts that cross
into worker processes (`WorkerContext` and what it carries) pickle: they hold the validated config, the
registry's picklable `RegistrySpec`, and builders that rebuild the registry on the other side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from weavelm.distributed import ParallelContext, ParallelLayout, TensorParallelGroup

if TYPE_CHECKING:
    import torch

    from weavelm.core.config import EngineConfig
    from weavelm.core.forward import AttentionSpec
    from weavelm.core.interfaces import AttentionBackend, ModelArchitecture, ModelLoader, ModelRunner, Worker


@dataclass(frozen=True)
class SchedulerLimits:
    """What a scheduler promises about every `SchedulerOutput` it will produce (from `Scheduler.limits`): at most
    `max_num_seqs` requests and `max_num_batched_tokens` tokens per step. The runner sizes its persistent batch and
    profiling pass from these, whatever the scheduler's option names are."""

    max_num_seqs: int
    max_num_batched_tokens: int


@dataclass(frozen=True)
class SchedulerContext:
    """Engine facts a scheduler is built with (the KV pool is sized before the scheduler exists)."""

    num_blocks: int
    block_size: int
    max_model_len: int
    enable_prefix_caching: bool
    lora: Any = None  # the engine's LoRAManager when `lora:` is configured: admit with `lora.can_admit`
    num_speculative_tokens: int = 0  # drafts per decode step (0: no speculative decoding)
    num_lookahead_tokens: int = 0  # extra slots a sampling request reserves for a KV-using proposer
    # schedule() may run again before update_from_output() of the previous step: a request whose last token is
    # still being sampled on the device counts it as a placeholder (`Request.num_output_placeholders`)
    async_scheduling: bool = False
    # every layer reads only a request's last `sliding_window` positions (`forward.kv_window` of the model's layers):
    # KV blocks wholly before them may be freed; None: some layer reads the whole context
    sliding_window: int | None = None


@dataclass
class ExecutorContext:
    """What an executor is built with. `build_worker(rank, world_size, distributed_init_method=None, layout=None)`
    builds and returns the configured worker (not yet initialised); it pickles, so a multi-process executor sends it
    to each worker process and calls it there, where it rebuilds the registry from entry points. `layout` (a
    `weavelm.distributed.ParallelLayout` of `world_size` ranks) says how the ranks split into tensor-parallel groups
    and pipeline stages; None: `world_size` tensor-parallel ranks."""

    config: EngineConfig
    build_worker: Callable[..., Worker]


@dataclass
class WorkerContext:
    """What a worker is built with. `build_runner(device)` builds the configured model runner for the device the
    worker chose in `init_device`. With `world_size > 1` the worker joins the process group at
    `distributed_init_method` (every rank of the executor gets the same one) before building the runner."""

    config: EngineConfig
    rank: int
    world_size: int
    build_runner: Callable[[torch.device], ModelRunner]
    distributed_init_method: str | None = None  # e.g. tcp://127.0.0.1:port when world_size > 1
    layout: ParallelLayout | None = None  # how the ranks split (tensor x pipeline); None: world_size TP ranks

    def __post_init__(self) -> None:
        if self.layout is None:
            self.layout = ParallelLayout(tensor=self.world_size)


@dataclass
class RunnerContext:
    """What a model runner is built with.

    `loader` is the configured (already selected) weight loader. `model_class(hf_config)` returns the registered
    architecture serving the config's `architectures`. `attention_backend(spec)` returns the configured attention
    backend for `spec` (for `auto`, the highest-priority registered backend whose `check(spec)` passes).
    `limits` bounds every step's batch. `tp` is this rank's tensor-parallel group (built from `rank` and
    `world_size` when not given); the runner builds the model with it. `quantization(spec)` returns the configured
    `QuantizationConfig` for a `QuantSpec` (None: dense weights); absent (None) means no quantization. `parallel`
holds every group of the rank (`weavelm.distributed.ParallelContext`: tp, pp, dp, ep); its `tp` is `tp`.
    """

    config: EngineConfig
    device: torch.device
    rank: int
    world_size: int
    limits: SchedulerLimits
    loader: ModelLoader
    model_class: Callable[[Any], type[ModelArchitecture]]
    attention_backend: Callable[[AttentionSpec], AttentionBackend]
    tp: TensorParallelGroup | None = None
    lora_manager: Callable[[], Any] | None = None  # builds the configured LoRAManager; None without `lora:`
    build_proposer: Callable[..., Any] | None = None  # (context, block_size, load_model) -> Proposer
    quantization: Callable[[Any], Any] | None = None
    parallel: ParallelContext | None = None  # pipeline / data / expert groups; None: tensor parallelism alone

    def __post_init__(self) -> None:
        if self.tp is None:
            self.tp = TensorParallelGroup(self.rank, self.world_size) if self.parallel is None else self.parallel.tp
        if self.parallel is None:
            self.parallel = ParallelContext(tp=self.tp)
