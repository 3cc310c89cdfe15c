"""The public, versioned contracts of every pluggable stage.

Call chain: LLMEngine -> EngineCoreClient -> EngineCore.step() -> Scheduler.schedule() -> Executor.execute_model()
-> Worker -> ModelRunner (model + AttentionBackend + sampler) -> ModelRunnerOutput -> Scheduler.update_from_output().

Every component class carries `name` (its registry key and YAML name), `description` (one line) and `Options`
(a pydantic model with extra="forbid" that validates its YAML section). Components are constructed by the engine
with their validated options; third parties subclass these ABCs and register through `weavelm_register`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from weavelm.core.config import EngineConfig
    from weavelm.core.forward import AttentionSpec, CommonAttentionMetadata, ForwardBatch
    from weavelm.core.outputs import (EngineCoreOutput, ModelRunnerOutput, RunnerFuture, SchedulerOutput,
                                      SchedulerStats)
    from weavelm.core.request import Request, RequestStatus

API_VERSION = "1.1"
"""Bumped on any change to the interfaces below or the data in outputs.py / forward.py (1.1: execute_model_async)."""

COMPONENT_KINDS = ("scheduler", "executor", "worker", "model_runner", "loader", "attention", "model")


class NoOptions(BaseModel):
    """Options of a component that takes none."""

    model_config = ConfigDict(extra="forbid")


class Component:
    """Common shape of every plugin component."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions


@dataclass
class SchedulerContext:
    """Engine facts a scheduler is built with (the KV pool is sized before the scheduler exists)."""

    num_blocks: int
    block_size: int
    max_model_len: int
    enable_prefix_caching: bool


class Scheduler(Component, ABC):
    """Owns request state and KV block accounting. Called only by EngineCore, from one thread.

    Per step the core calls `schedule()`, hands the result to the executor, then calls `update_from_output()` with
    the runner's output for that same SchedulerOutput. Must hold: a request's blocks cover
    `num_computed_tokens + num_scheduled_tokens`; `total_num_scheduled_tokens` stays within the token budget;
    every request added is eventually reported finished exactly once.
    """

    def __init__(self, options: BaseModel, context: SchedulerContext):
        self.options = options
        self.context = context

    def check_request(self, request: Request) -> str | None:
        """Called by EngineCore before `add_request`: why this request can never be scheduled under this
        scheduler's limits (e.g. a prompt above the token budget with chunked prefill off, or more blocks than
        the pool holds), or None when it can. A reason rejects the request with a RequestError; nothing is
        queued."""
        return None

    @abstractmethod
    def add_request(self, request: Request) -> None:
        """Queue a new, validated request (one that passed `check_request`)."""

    @abstractmethod
    def schedule(self) -> SchedulerOutput:
        """Choose the requests and token counts to run this step and reserve their KV blocks."""

    @abstractmethod
    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Append sampled tokens, detect stop token ids / max_tokens, free finished requests' blocks, and return
        one delta per request that produced a token or finished."""

    @abstractmethod
    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[EngineCoreOutput]:
        """Finish requests from outside (abort, stop string) in any state, freeing their blocks at once."""

    @abstractmethod
    def has_unfinished_requests(self) -> bool: ...

    @abstractmethod
    def get_stats(self) -> SchedulerStats: ...


class Executor(Component, ABC):
    """Runs the workers (in process, in processes, on Ray) and carries the two messages to and from them.

    Lifecycle, driven by EngineCore: `__init__` -> `determine_num_blocks()` -> `initialize_cache(n)` ->
    `execute_model()` per step -> `shutdown()`.
    """

    def __init__(self, options: BaseModel, config: EngineConfig):
        self.options = options
        self.config = config

    @abstractmethod
    def determine_num_blocks(self) -> int:
        """The number of KV blocks every worker can hold (the minimum across workers)."""

    @abstractmethod
    def initialize_cache(self, num_blocks: int) -> None: ...

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> RunnerFuture:
        """Launch the step and return before the device finishes, so the caller can overlap host work (output
        processing) with it. The default runs `execute_model` synchronously."""
        from weavelm.core.outputs import RunnerFuture
        return RunnerFuture(self.execute_model(scheduler_output))

    def model_info(self) -> dict[str, Any]:
        """Facts about the loaded model the core needs (max_model_len, eos_token_id, vocab_size)."""
        return {}

    def shutdown(self) -> None:
        """Release workers. Idempotent."""


class Worker(Component, ABC):
    """One device's share of the work: device setup, model loading, KV sizing; forwards steps to its runner."""

    def __init__(self, options: BaseModel, config: EngineConfig, rank: int = 0, world_size: int = 1):
        self.options = options
        self.config = config
        self.rank = rank
        self.world_size = world_size

    @abstractmethod
    def init_device(self) -> None: ...

    @abstractmethod
    def load_model(self) -> None: ...

    @abstractmethod
    def determine_num_blocks(self) -> int: ...

    @abstractmethod
    def initialize_cache(self, num_blocks: int) -> None: ...

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> RunnerFuture:
        """Launch the step and return before the device finishes, so the caller can overlap host work (output
        processing) with it. The default runs `execute_model` synchronously."""
        from weavelm.core.outputs import RunnerFuture
        return RunnerFuture(self.execute_model(scheduler_output))

    def model_info(self) -> dict[str, Any]:
        return {}


class ModelRunner(Component, ABC):
    """Keeps the persistent batch (per-request rows on the device, updated from SchedulerOutput deltas),
    prepares inputs, runs the model and the sampler."""

    def __init__(self, options: BaseModel, config: EngineConfig, device: torch.device):
        self.options = options
        self.config = config
        self.device = device

    @abstractmethod
    def load_model(self) -> None: ...

    @abstractmethod
    def kv_cache_bytes_per_block(self) -> int: ...

    @abstractmethod
    def initialize_kv_cache(self, num_blocks: int) -> None: ...

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> RunnerFuture:
        """Launch the step and return before the device finishes, so the caller can overlap host work (output
        processing) with it. The default runs `execute_model` synchronously."""
        from weavelm.core.outputs import RunnerFuture
        return RunnerFuture(self.execute_model(scheduler_output))


class ModelLoader(Component, ABC):
    """Reads one weight format. Never executes code from a weight file.

    The runner calls `load_hf_config(path)` to learn the architecture, builds the model, then `load_weights(model,
    path)`. The default `load_weights` streams `iter_weights` into `model.load_weights` and checks that every
    parameter was loaded and nothing unexpected was given.
    """

    def __init__(self, options: BaseModel):
        self.options = options

    @classmethod
    def detect(cls, path: str) -> str | None:
        """For `auto`: a short reason if this loader recognises `path`, else None."""
        return None

    def load_hf_config(self, path: str) -> Any:
        """The model's transformers `PretrainedConfig`. Default: `config.json` in the directory."""
        from weavelm.core.model_files import load_hf_config
        return load_hf_config(path)

    def load_tokenizer(self, path: str) -> Any | None:
        """A tokenizer for `path`, or None to use the transformers tokenizer beside the weights."""
        return None

    @abstractmethod
    def iter_weights(self, path: str) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(checkpoint_name, tensor)` in Hugging Face naming, one tensor at a time."""

    def load_weights(self, model: ModelArchitecture, path: str) -> None:
        from weavelm.core.model_files import load_into_model
        load_into_model(model, self.iter_weights(path), source=path)


class ModelArchitecture(torch.nn.Module):
    """A decoder-only architecture written for flattened token batches and a paged KV cache.

    `hf_architectures` lists the transformers `architectures` strings it serves. Built as
    `cls(hf_config, dtype)` on the target device. `forward` takes the flat `input_ids` / `positions` of all
    scheduled tokens and returns hidden states (num_tokens, hidden); `compute_logits` maps selected hidden states to
    vocabulary logits. `load_weights` consumes checkpoint-named tensors and returns the parameter names it filled.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions
    hf_architectures: ClassVar[tuple[str, ...]] = ()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        raise NotImplementedError

    def attention_layout(self) -> tuple[int, int, int, int]:
        """(num_layers, num_heads, num_kv_heads, head_size) for KV cache sizing."""
        raise NotImplementedError


class AttentionImpl(ABC):
    """Runs one layer's attention. `forward` writes the new K/V into `kv_cache` at `slot_mapping` and returns the
    attention output for the flattened batch (prefill chunks with cached prefixes and decodes, causal).

    q: (num_tokens, num_heads * head_size), k / v: (num_tokens, num_kv_heads * head_size); returns like q.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.scale = scale

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: Any) -> torch.Tensor: ...


class AttentionMetadataBuilder:
    """Turns the common metadata into what the backend's kernels need; called once per step by the runner."""

    def build(self, common: CommonAttentionMetadata) -> Any:
        return common


class AttentionBackend(Component, ABC):
    """Stateless descriptor of an attention implementation: cache layout, metadata builder, impl.

    `check(spec)` returns the reasons the backend cannot run for `spec` (empty list: it runs). `graph_safe` says
    whether its forward may be captured in a CUDA graph (static shapes, no host syncs).
    """

    graph_safe: ClassVar[bool] = False

    def __init__(self, options: BaseModel):
        self.options = options

    @classmethod
    def check(cls, spec: AttentionSpec) -> list[str]:
        return []

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple:
        """Shape of one layer's cache. Default: K and V stacked, `(2, num_blocks, block_size, kv_heads, head)`."""
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    def make_builder(self, device: torch.device) -> AttentionMetadataBuilder:
        return AttentionMetadataBuilder()

    @abstractmethod
    def make_impl(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float) -> AttentionImpl: ...
