"""The attention contract (vLLM's three parts): `AttentionBackend` (a stateless descriptor: cache shape, `check`,
priority, `make_impl`), `AttentionMetadataBuilder` and `AttentionImpl` (one layer's `forward`). Re-exported by
`core/interfaces.py` and `weavelm.plugin`; part of the versioned API there."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel

from weavelm.core.component import Component

if TYPE_CHECKING:
    from collections.abc import Mapping
    from weavelm.core.forward import AttentionSpec, CommonAttentionMetadata


class AttentionImpl(ABC):
    """Runs one layer's attention. `forward` writes the new K/V into `kv_cache` at `slot_mapping` and returns the
    attention output for the flattened batch (prefill chunks with cached prefixes and decodes, causal).

    q: (num_tokens, num_heads * head_size), k / v: (num_tokens, num_kv_heads * head_size); returns like q.

    `sliding_window` (None: the whole context) limits each query at position p to keys p - sliding_window + 1 .. p;
    blocks before that may be freed and their block-table entries point at blocks holding other data, so an impl
    with a window must not read them.

    Optional capabilities a model may use (both default False):
    - `accepts_strided_qkv`: q, k and v may be column slices of one (num_tokens, (heads + 2 kv_heads) * head_size)
      buffer (row stride larger than their width; unit column stride), so the model skips three copies.
    - `native_paged_attention`: when a step's metadata has `common` set (a `CommonAttentionMetadata`), this impl's
      attention is exactly weavelm's native `wl_paged_attention` over the default cache layout, so a model may run
      its whole decoder stack in one native call for that step (weavelm/plugins/models/native_stack.py).

    `k_scale` / `v_scale`: the layer's fp8 KV-cache scales (vLLM's `k_scale` / `v_scale`; default 1.0, which the
    engine keeps: per-layer checkpoint scales are not read yet; whoever builds the impl may set them before its
    first forward). When `kv_cache` is fp8 (`AttentionSpec.kv_cache_dtype`), `forward` stores `k / k_scale`
    saturated to the fp8 range and reads `fp8 * k_scale` (`weavelm.ops.kv_quant`); values likewise.
    """

    accepts_strided_qkv = False
    native_paged_attention = False
    k_scale: float = 1.0
    v_scale: float = 1.0

    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float,
                 sliding_window: int | None = None):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.scale = scale
        self.sliding_window = sliding_window

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: Any) -> torch.Tensor: ...


class AttentionMetadataBuilder:
    """Turns the common metadata into what the backend's kernels need; called once per step by the runner (and
    once per captured batch size for CUDA graphs). Each backend owns its builder (`AttentionBackend.make_builder`).
    The default passes the common metadata through."""

    def build(self, common: CommonAttentionMetadata) -> Any:
        return common


class AttentionBackend(Component, ABC):
    """Stateless descriptor of an attention implementation: cache layout, metadata builder, impl.

    `check(spec)` returns the reasons the backend cannot run for `spec` (empty list: it runs). `priority` ranks it
    for `attention: auto`, which picks the highest-priority backend whose check passes (built-ins: flash_attn 30,
    triton 20, cpu 10, torch_ref 0). `graph_safe` says whether its forward may be captured in a CUDA graph (static shapes,
    no host syncs).
    """

    graph_safe: ClassVar[bool] = False
    priority: ClassVar[int] = 0
    # whether `check` looks at `spec.kv_cache_dtype` (accepting an fp8 cache or giving a reason); a backend that
    # does not is refused every cache dtype but the model's (see `reasons`)
    checks_kv_cache_dtype: ClassVar[bool] = False

    def __init__(self, options: BaseModel):
        self.options = options

    @classmethod
    def check(cls, spec: AttentionSpec) -> list[str]:
        """Reasons this backend cannot run `spec` on this machine; empty when it can."""
        return []

    @classmethod
    def auto_check(cls, spec: AttentionSpec) -> list[str]:
        """Reasons `attention: auto` should not pick this backend for `spec` (default: `check`'s). A backend may
        refuse more here than when named explicitly (e.g. an emulated or debug-only mode)."""
        return cls.check(spec)

    @classmethod
    def reasons(cls, spec: AttentionSpec, for_auto: bool = False) -> list[str]:
        """What the engine goes by (not meant to be overridden): `check` (or `auto_check` for `auto`), plus a
        refusal of a windowed model when `make_impl` takes no `sliding_window`, so a backend written before windows
        existed is never silently used for one, and of a KV cache dtype other than the model's when the backend
        does not `checks_kv_cache_dtype`."""
        reasons = list(cls.auto_check(spec) if for_auto else cls.check(spec))
        kv_dtype = getattr(spec, "kv_cache_dtype", None)
        if kv_dtype is not None and kv_dtype != spec.dtype and not cls.checks_kv_cache_dtype:
            reasons.append(f"kv_cache_dtype {kv_dtype}: this backend keeps the KV cache in the model's dtype only")
        if spec.sliding_window is not None and \
                "sliding_window" not in inspect.signature(cls.make_impl).parameters:
            reasons.append(f"sliding_window {spec.sliding_window}: its make_impl takes no sliding_window")
        return reasons

    @classmethod
    def select(cls, options: BaseModel, spec: AttentionSpec,
               candidates: Mapping[str, type[AttentionBackend]]) -> AttentionBackend:
        """Called by the assembler (through `RunnerContext.attention_backend`) to build the configured backend for
        `spec`; `candidates` are all registered backends. The default builds this class, or raises PluginError
        with `check`'s reasons; the `auto` selector overrides it."""
        from weavelm.errors import PluginError

        reasons = cls.reasons(spec)
        if reasons:
            raise PluginError(f"attention backend {cls.name!r} cannot run here: {'; '.join(reasons)}; choose "
                              f"another with attention: <name> (installed: {', '.join(candidates)})")
        return cls(options)

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple:
        """Shape of one layer's cache; the runner sizes the KV pool from it. Default: K and V stacked,
        `(2, num_blocks, block_size, kv_heads, head)`."""
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    def make_builder(self, device: torch.device) -> AttentionMetadataBuilder:
        return AttentionMetadataBuilder()

    @abstractmethod
    def make_impl(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float,
                  sliding_window: int | None = None) -> AttentionImpl:
        """One layer's impl. The runner passes `sliding_window` only for a windowed layer, and only to a backend
        whose `reasons(spec)` accepted the model's windows."""
