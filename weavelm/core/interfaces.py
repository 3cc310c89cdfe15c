"""The public, versioned contracts of every pluggable stage.

Call chain: LLMEngine -> EngineCoreClient -> EngineCore.step() -> Scheduler.schedule() -> Executor.execute_model()
-> Worker -> ModelRunner (model + AttentionBackend + sampler) -> ModelRunnerOutput -> Scheduler.update_from_output().

Every component class carries `name` (its registry key and YAML name), `description` (one line) and `Options`
(a pydantic model with extra="forbid" that validates its YAML section). Components are constructed only by the
assembler (`core/assembly.py`), each with its validated options and a small typed context (`core/contexts.py`);
no component builds or looks up another. Third parties subclass these ABCs (import them from `weavelm.plugin`)
and register through `weavelm_register`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel

# the attention contract and the component base live in their own modules; re-exported here with the other ABCs
from weavelm.core.attention_interfaces import (AttentionBackend, AttentionImpl,  # noqa: F401
                                               AttentionMetadataBuilder)
from weavelm.core.component import Component, NoOptions  # noqa: F401
from weavelm.core.contexts import (ExecutorContext, RunnerContext, SchedulerContext, SchedulerLimits,
                                   WorkerContext)
from weavelm.core.graph_variants import CudaGraphVariants
from weavelm.errors import LoRAError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from weavelm.core.forward import ForwardBatch
    from weavelm.core.outputs import (EngineCoreOutput, ModelRunnerOutput, RunnerFuture, SchedulerOutput,
                                      SchedulerStats)
    from weavelm.core.request import Request, RequestStatus

API_VERSION = "2.5"
"""The plugin API: bumped on any change to the interfaces below, the contexts in contexts.py or the data in
outputs.py / forward.py. Major: existing plugins break (refused at load); minor: additions only.
1.1: execute_model_async. 2.0: components built by the assembler with typed contexts; Scheduler.limits and
check_request; Executor.collective_rpc; ModelRunner.model_info / profile_peak_memory / set_logits_hook;
AttentionBackend.priority and select (`auto` is a plugin); ModelLoader.select. 2.1: the `lora_manager` kind; the `proposer` kind
(speculative decoding, `weavelm.core.proposer.Proposer`); SchedulerContext.num_speculative_tokens /
num_lookahead_tokens; RunnerContext.build_proposer; ModelRunnerOutput.spec_token_ids / proposer_time_s (and
sampled_token_ids may hold several tokens per request); SchedulerStats.spec_*. 2.2: async scheduling
(Scheduler.supports_async_scheduling, SchedulerContext.async_scheduling, Request.num_output_placeholders; a runner
takes the input token of a position past its known tokens from the previous step's samples on the device). 2.3:
inspection hooks reached through `LLM.collective_rpc` (Worker.apply_model / cached_request_ids /
apply_proposer, ModelRunner.get_model / cached_request_ids / get_proposer); the `kernels:` config section and `num_threads`;
sliding-window attention (AttentionSpec.sliding_window, AttentionImpl.sliding_window and make_impl's
`sliding_window` keyword, AttentionBackend.reasons, ModelArchitecture.attention_windows,
SchedulerContext.sliding_window). 2.4: ModelArchitecture.packed_modules_mapping / hf_to_weavelm_mapper (LoRA by
type over `weavelm.layers`), CudaGraphVariants, the typed speculative-decoding batch view and ProposeInput's hidden
states, QuantizedTensor and QuantizeMethodBase.native_pack, LoRAManager's run-time add/remove, the `tool_parser`
and `reasoning_parser` kinds, ModelRunnerOutput.pooler_output / EngineCoreOutput.pooling_output. 2.5: multimodal inputs
(`weavelm.core.multimodal`: SupportsMultiModal, MultiModalFeature, PlaceholderRange; Request.mm_features,
NewRequestData.mm_features, SchedulerOutput.scheduled_encoder_inputs written and free_encoder_input_ids;
SchedulerOptions.max_num_encoder_input_tokens / encoder_cache_size; composite architectures'
`with_language_model`)."""

COMPONENT_KINDS = ("scheduler", "executor", "worker", "model_runner", "loader", "attention", "model",
                   "lora_manager", "proposer", "quantization", "tool_parser", "reasoning_parser")


class Scheduler(Component, ABC):
    """Owns request state and KV block accounting. Called only by EngineCore, from one thread.

    Per step the core calls `schedule()`, hands the result to the executor, then calls `update_from_output()` with
    the runner's output for that same SchedulerOutput. Without async scheduling, `schedule()` for step N+1 is never
    called before `update_from_output()` of step N. A scheduler whose class sets `supports_async_scheduling` may be
    built with `context.async_scheduling`: then `schedule()` for step N+1 runs while step N is on the device, before
    its `update_from_output()`, and a request whose step-N token is not known yet counts it in
    `Request.num_output_placeholders` (see `BaseScheduler`). A from-scratch scheduler must meet these duties:

    - Budget: each SchedulerOutput holds at most `limits(options).max_num_seqs` requests and
      `max_num_batched_tokens` tokens, and never schedules a request past `context.max_model_len`.
    - Blocks: after `schedule()`, a scheduled request's block table covers `num_computed_tokens +
      num_scheduled_tokens[req_id]` tokens. New requests carry their whole block table in `NewRequestData`;
      running requests carry only appended block ids in `CachedRequestsData.new_block_ids`. A request resumed after
      preemption has `resumed_from_preemption=True` and its `new_block_ids` are its *whole* new table (its old
      blocks were freed when it was preempted, and its KV is recomputed from `num_computed_tokens`).
    - `num_computed_tokens` advances when the step is scheduled (by the scheduled count), before the runner runs:
      `CachedRequestsData.num_computed_tokens` and `NewRequestData.num_computed_tokens` are the values *before*
      this step's tokens (prefix-cache hits included). A preempted request drops back to 0 (recompute).
    - Sampled tokens: in `update_from_output`, append each request's `sampled_token_ids`, stop on eos (unless
      `ignore_eos`), `stop_token_ids` and `max_tokens`/`max_model_len`, and return one `EngineCoreOutput` per
      request that produced tokens or finished.
    - Speculative decoding (`context.num_speculative_tokens > 0`): `BaseScheduler` grants drafts from
      `ModelRunnerOutput.spec_token_ids` in `scheduled_spec_decode_tokens`, rolls `num_computed_tokens` back past
      rejected drafts and frees the blocks past those holding the request's known tokens (`weavelm.spec_decode`);
      a from-scratch scheduler that ignores `spec_token_ids` simply runs without speculation.
    - Pooling (`runner: pooling`): a request whose id is in `ModelRunnerOutput.pooler_output` finishes with
      FINISHED_STOPPED, its EngineCoreOutput carrying the vector in `pooling_output` (the runner pools a prompt when
      its last chunk is computed and samples nothing).
    - Finishing: a finished request's blocks are freed at once and its id is reported in the *next*
      SchedulerOutput's `finished_req_ids` (so the worker drops its state), exactly once. `finish_requests`
      (abort, stop strings) does the same for requests in any state.
    - Prefix caching (when `context.enable_prefix_caching`): full blocks become shareable only once their tokens
      are computed, i.e. in `update_from_output` of the step that computed them, never at schedule time.
    - LoRA (when `context.lora` is set): admit a waiting request only if `context.lora.can_admit(request,
      running)`; one that may not waits (others behind it may go first), so no batch needs more adapters than
      the runner has slots. New requests carry their `lora_request` in `NewRequestData`.
    """

    supports_async_scheduling: ClassVar[bool] = False

    def __init__(self, options: BaseModel, context: SchedulerContext):
        self.options = options
        self.context = context

    @classmethod
    @abstractmethod
    def limits(cls, options: BaseModel) -> SchedulerLimits:
        """The per-step limits this scheduler will keep with `options`. Called by the assembler before anything
        is built, so the runner can size its persistent batch."""

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
    def has_unfinished_requests(self) -> bool:
        """Whether any request is waiting or running."""

    @abstractmethod
    def get_stats(self) -> SchedulerStats:
        """Current counts (running, waiting, KV blocks used/total, prefix hit rate); called after every step."""


class Executor(Component, ABC):
    """Runs the workers and carries the two messages to and from them. Built-ins: `uniproc` (one worker in the
    engine's own process), `multiproc` (one spawned process per rank) and `ray` (one actor per rank).

    Lifecycle, driven by EngineCore: `__init__` (builds its workers with `context.build_worker(rank, world_size)`
    and calls their `init_device()` and `load_model()`) -> `model_info()` -> `determine_num_blocks()` ->
    `initialize_cache(n)` -> `execute_model_async()` per step -> `shutdown()`.
    """

    def __init__(self, options: BaseModel, context: ExecutorContext):
        self.options = options
        self.context = context
        self.config = context.config

    @abstractmethod
    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None,
                       ranks: list[int] | None = None) -> list[Any]:
        """Call `worker.<method>(*args, **kwargs)` on every worker (or on `ranks`) and return their results in
        rank order. The one verb through which the core (and tests, via `LLM.collective_rpc`) reach workers, so a
        new worker method needs no executor change."""

    def determine_num_blocks(self) -> int:
        """The number of KV blocks every worker can hold: the minimum of the workers' `determine_num_blocks`."""
        return min(self.collective_rpc("determine_num_blocks"))

    def initialize_cache(self, num_blocks: int) -> None:
        """Allocate `num_blocks` KV blocks on every worker."""
        self.collective_rpc("initialize_cache", (num_blocks,))

    @abstractmethod
    def execute_model_async(self, scheduler_output: SchedulerOutput) -> RunnerFuture:
        """Send the step to every worker and return before the device finishes, so the caller can overlap host work
        (output processing) with it; the future's `result()` is rank 0's `ModelRunnerOutput`."""

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and wait for its output."""
        return self.execute_model_async(scheduler_output).result()

    def start_workers(self) -> None:
        """For executors whose workers sit behind a `WorkerWrapperBase` (other processes, Ray actors): build each
        rank's worker, initialise its device and load the model, all ranks together (collectives need every rank);
        on any failure shut everything down and re-raise."""
        try:
            for method in ("init_worker", "init_device", "load_model"):
                self.collective_rpc(method)
        except BaseException:
            self.shutdown()
            raise

    def model_info(self) -> dict[str, Any]:
        """Facts about the loaded model the core needs (max_model_len, vocab_size, dtype, attention): rank 0's
        `Worker.model_info()`."""
        return self.collective_rpc("model_info", ranks=[0])[0]

    def shutdown(self) -> None:
        """Release workers. Idempotent."""


class Worker(Component, ABC):
    """One device's share of the work: device setup, model loading, KV sizing; forwards steps to its runner.

    Called by its executor in this order: `init_device()` (choose and set up the device, then build the runner
    with `context.build_runner(device)`), `load_model()`, `model_info()`, `determine_num_blocks()`,
    `initialize_cache(n)` with the minimum over workers, then `execute_model[_async]()` per step.
    """

    def __init__(self, options: BaseModel, context: WorkerContext):
        self.options = options
        self.context = context
        self.config = context.config
        self.rank = context.rank
        self.world_size = context.world_size

    @abstractmethod
    def init_device(self) -> None:
        """Pick and initialise this rank's device and build the model runner on it."""

    @abstractmethod
    def load_model(self) -> None:
        """Load the model through the runner."""

    @abstractmethod
    def model_info(self) -> dict[str, Any]:
        """The runner's `model_info()` plus the device."""

    @abstractmethod
    def determine_num_blocks(self) -> int:
        """KV blocks this worker's device can hold (cache.num_blocks when fixed; else from memory)."""

    @abstractmethod
    def initialize_cache(self, num_blocks: int) -> None:
        """Allocate `num_blocks` KV blocks (the minimum across workers) and finish setup (e.g. CUDA graphs)."""

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step; the result matters on rank 0 only."""

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> RunnerFuture:
        """Launch the step and return before the device finishes, so the caller can overlap host work (output
        processing) with it. The default runs `execute_model` synchronously."""
        from weavelm.core.outputs import RunnerFuture
        return RunnerFuture(self.execute_model(scheduler_output))

    def set_logits_hook(self, hook: Callable[[list[str], torch.Tensor], torch.Tensor | None] | None) -> None:
        """Forward to the runner's `set_logits_hook` (testing and debugging; in-process workers only)."""
        raise NotImplementedError(f"worker {self.name!r} does not support logits hooks")

    # -- inspection hooks, reached with `LLM.collective_rpc(name, args)` (tests, tools; between requests) -----
    def apply_model(self, func: Callable[[torch.nn.Module], Any]) -> Any:
        """Return `func(model)` for this rank's model (vLLM's `apply_model`): read weights or layers, count
        parameters. `func` crosses to worker processes by pickle, so a multi-process executor needs a module-level
        function."""
        raise NotImplementedError(f"worker {self.name!r} does not support apply_model")

    def cached_request_ids(self) -> list[str]:
        """The requests whose state this rank's runner holds now; a finished or aborted request must leave."""
        raise NotImplementedError(f"worker {self.name!r} does not report its cached requests")

    def apply_proposer(self, func: Callable[[Any], Any]) -> Any:
        """Return `func(proposer)` for this rank's speculative-decoding proposer (None without `speculative:`);
        what the proposer contract suite calls `propose` on directly."""
        raise NotImplementedError(f"worker {self.name!r} does not support apply_proposer")


class ModelRunner(Component, ABC):
    """Keeps the persistent batch (per-request rows on the device, updated from SchedulerOutput deltas),
    prepares inputs, runs the model and the sampler. Built by its worker through `context.build_runner(device)`;
    everything else it needs (loader, architecture, attention backend, batch limits) is in its `RunnerContext`.

    Called in this order: `load_model()`, `model_info()`, `kv_cache_bytes_per_block()` and (on GPUs, when the pool
    is sized from memory) `profile_peak_memory()`, `initialize_kv_cache(n)`, then `execute_model[_async]()`.
    """

    def __init__(self, options: BaseModel, context: RunnerContext):
        self.options = options
        self.context = context
        self.config = context.config
        self.device = context.device

    @abstractmethod
    def load_model(self) -> None:
        """Build the architecture, load its weights through `context.loader` and choose the attention backend."""

    @abstractmethod
    def model_info(self) -> dict[str, Any]:
        """At least `max_model_len`, `vocab_size`, `dtype` (str) and `attention` (the backend's name)."""

    @abstractmethod
    def kv_cache_bytes_per_block(self) -> int:
        """Bytes of one KV block across all layers, from the attention backend's `kv_cache_shape`."""

    def profile_peak_memory(self) -> int:
        """Peak device bytes of the largest step the limits allow (a forward of `max_num_batched_tokens` tokens and
        sampling for `max_num_seqs` rows), run before the real KV cache exists. Only called on GPUs."""
        raise NotImplementedError(f"model runner {self.name!r} cannot profile memory; set cache.num_blocks")

    @abstractmethod
    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate every layer's cache in the backend's `kv_cache_shape` and capture CUDA graphs if enabled."""

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Apply the step's deltas to the persistent batch, run the forward and sample."""

    def set_logits_hook(self, hook: Callable[[list[str], torch.Tensor], torch.Tensor | None] | None) -> None:
        """Testing and debugging: call `hook(req_ids, logits)` every step with the float32 logits
        (num_sampled_rows, vocab) of the rows about to be sampled; a returned tensor replaces the logits (teacher
        forcing). `None` removes it. Steps then run eagerly where the hook must see logits."""
        raise NotImplementedError(f"model runner {self.name!r} does not support logits hooks")

    def get_model(self) -> torch.nn.Module:
        """The loaded model (for the worker's `apply_model`)."""
        raise NotImplementedError(f"model runner {self.name!r} does not expose its model")

    def cached_request_ids(self) -> list[str]:
        """The requests whose rows the persistent batch holds now (for the worker's `cached_request_ids`)."""
        raise NotImplementedError(f"model runner {self.name!r} does not report its cached requests")

    def get_proposer(self) -> Any:
        """The speculative-decoding proposer, or None (for the worker's `apply_proposer`)."""
        return None

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> RunnerFuture:
        """Launch the step and return before the device finishes, so the caller can overlap host work (output
        processing) with it. The default runs `execute_model` synchronously."""
        from weavelm.core.outputs import RunnerFuture
        return RunnerFuture(self.execute_model(scheduler_output))


class ModelLoader(Component, ABC):
    """Reads one weight format. Never executes code from a weight file.

    The assembler builds the configured loader with `select`. The frontend calls `load_hf_config(path)` and
    `load_tokenizer(path)`; the runner calls `load_hf_config(path)` to learn the architecture, builds the model,
    then `load_weights(model, path)`. The default `load_weights` streams `iter_weights` into `model.load_weights`
    and checks that every parameter was loaded and nothing unexpected was given.
    """

    def __init__(self, options: BaseModel):
        self.options = options

    @classmethod
    def select(cls, options: BaseModel, candidates: Mapping[str, type[ModelLoader]]) -> ModelLoader:
        """Called by the assembler to build the configured loader; `candidates` are all registered loaders. The
        default builds this class; a selector such as `auto` overrides it to choose among the candidates."""
        return cls(options)

    @classmethod
    def detect(cls, path: str) -> str | None:
        """For `auto`: a short reason if this loader recognises `path`, else None."""
        return None

    def load_hf_config(self, path: str) -> Any:
        """The model's transformers `PretrainedConfig`. Default: `config.json` in the directory `path`, or beside
        the weight file `path`."""
        import os

        from weavelm.core.model_files import load_hf_config
        return load_hf_config(path if os.path.isdir(path) else os.path.dirname(path) or ".")

    def load_tokenizer(self, path: str) -> Any | None:
        """A tokenizer for `path`, or None to use the transformers tokenizer beside the weights."""
        return None

    def checkpoint_num_elements(self, path: str) -> int | None:
        """Total elements (product of each tensor's logical shape) of the checkpoint at `path`, read from file
        headers or tensor tables without loading tensor data; rotary `inv_freq` buffers are not counted, and a
        quantized tensor counts its dequantized shape. None when unknown (e.g. `dummy`, which has no checkpoint).

        Called once per load, after `load_hf_config(path)` and before the model is built, so a config.json that
        does not match the weights fails before anything is allocated. Raises LoadError for unreadable files."""
        return None

    def weight_types(self, path: str) -> dict[str, str]:
        """The stored type of each quantized tensor by checkpoint name (e.g. GGUF's "Q4_1"), read from headers;
        empty for float checkpoints. `quantization: auto` chooses a scheme from it. Default: empty."""
        return {}

    @abstractmethod
    def iter_weights(self, path: str) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(checkpoint_name, tensor)` in Hugging Face naming, one tensor at a time."""

    def load_weights(self, model: ModelArchitecture, path: str) -> None:
        from weavelm.core.model_files import load_into_model
        load_into_model(model, self.iter_weights(path), source=path)


class ModelArchitecture(torch.nn.Module):
    """A decoder-only architecture written for flattened token batches and a paged KV cache.

    `hf_architectures` lists the transformers `architectures` strings it serves. Built by the model runner as
    `cls(hf_config, tp)` (`tp`: the rank's `weavelm.distributed.TensorParallelGroup`, default one rank; with one
    rank the runner calls `cls(hf_config)`, so an architecture without tensor parallelism may omit the argument)
    inside `torch.device(device)` with the engine's dtype as torch's default dtype, so parameters are created on
    the device in that dtype; also built on the `meta` device to count parameters before loading. Each rank holds
    its shard of the weights and calls `tp.all_reduce` / `tp.all_gather` itself. `forward` takes the flat
    `input_ids` / `positions` of all scheduled tokens and returns hidden states (num_tokens, hidden), the same on
    every rank; `compute_logits` maps selected hidden states to full-vocabulary logits on every rank.
    `load_weights` consumes checkpoint-named, whole-model tensors (`torch.Tensor` or
    `weavelm.core.model_files.LazyTensor`, whose `narrow` reads only a slice), copies this rank's shard, and returns
    the parameter names it filled.

    Built from `weavelm.layers`, an architecture gets LoRA by declaring `packed_modules_mapping` (each packed
    layer's checkpoint parts, e.g. `{"qkv_proj": ["q_proj", "k_proj", "v_proj"]}`; empty when the checkpoint is
    already fused) and `hf_to_weavelm_mapper` (a `weavelm.layers.WeightsMapper` from checkpoint module names to its
    own; None: the same names).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions
    hf_architectures: ClassVar[tuple[str, ...]] = ()
    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {}
    hf_to_weavelm_mapper: ClassVar[Any] = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        raise NotImplementedError

    def attention_layout(self) -> tuple[int, int, int, int]:
        """(num_layers, num_heads, num_kv_heads, head_size) of this rank (its share of the heads), for KV cache
        sizing and the attention backend."""
        raise NotImplementedError

    def attention_windows(self) -> list[int | None]:
        """Each layer's sliding window (it attends to its last `w` positions only) or None (its whole context).
        The runner builds each layer's attention impl with it and frees KV blocks no layer can see any more.
        Default: the `sliding_window` of each `weavelm.layers.Attention` in the model (None where there is none)."""
        from weavelm.layers.attention import Attention

        windows: list[int | None] = [None] * self.attention_layout()[0]
        for module in self.modules():
            if isinstance(module, Attention):
                windows[module.layer_idx] = module.sliding_window
        return windows


class LoRAManager(Component, CudaGraphVariants, ABC):
    """Multi-LoRA serving (the `lora:` section; kind `lora_manager`). One instance lives in the engine core and
    one in each model runner; each side calls only its half.

    Engine core: `set_targets(model_info["lora_targets"])` once; `check_request(lora_request)` before a request is
    queued (raise `LoRAError` to fail that request only); `can_admit(request, running)` from the scheduler before
    it admits a waiting request on an adapter (False: it waits; the running set must never need more adapters
    than fit a batch; base-model requests are not asked about, and an adapter refused once is not asked about
    again in the same step); `num_active(running)` for stats; `lora_request(name)` resolves a configured adapter's name.
    Run-time adapters (optional; the defaults refuse): `add_lora(lora_request) -> bool`, `load_lora(name, path,
    replace)` (a new id; returns the request), `remove_lora(id or name) -> bool` and `named_loras()` ({name: request}).
    Model runner: `attach(model, device, dtype, max_tokens)` once after the weights are loaded (wrap layers,
    return the `LoRATargets` reported in `model_info`); `prepare(row_loras, counts, logits_rows)` before every
    forward; `set_head_rows(lora_request, n)` before a `compute_logits` over `n` rows of one request.
    CUDA graphs: the `CudaGraphVariants` capability (`weavelm.core.graph_variants`); a manager whose layers skip
    their kernels on steps without adapters declares a variant with and one without them.
    """

    def __init__(self, options: BaseModel):
        self.options = options

    @abstractmethod
    def set_targets(self, targets: Any) -> None: ...

    @abstractmethod
    def check_request(self, lora_request: Any) -> None: ...

    @abstractmethod
    def can_admit(self, request: Request, running: list[Request]) -> bool: ...

    @abstractmethod
    def num_active(self, running: list[Request]) -> int: ...

    @abstractmethod
    def lora_request(self, name: str) -> Any: ...

    @abstractmethod
    def attach(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, max_tokens: int) -> Any: ...

    @abstractmethod
    def prepare(self, row_loras: list, counts: Any, logits_rows: Any) -> None: ...

    @abstractmethod
    def set_head_rows(self, lora_request: Any, n: int) -> None: ...

    def add_lora(self, lora_request: Any) -> bool:
        raise LoRAError(f"the {type(self).__name__} lora_manager does not support adding adapters at run time")

    def load_lora(self, lora_name: str, lora_path: str, replace: bool = False) -> Any:
        raise LoRAError(f"the {type(self).__name__} lora_manager does not support adding adapters at run time")

    def remove_lora(self, lora: int | str) -> bool:
        raise LoRAError(f"the {type(self).__name__} lora_manager does not support removing adapters at run time")

    def named_loras(self) -> dict[str, Any]:
        return {}
