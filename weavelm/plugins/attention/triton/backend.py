"""The `triton` attention backend: its own Triton kernels for the cache write, paged attention and split-KV decode.

triton is imported only when a forward first runs (or `check()` probes it), never when plugins are listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from weavelm.core.forward import AttentionSpec, CommonAttentionMetadata
from weavelm.core.hookspecs import hookimpl
from weavelm.core.interfaces import AttentionBackend, AttentionImpl, AttentionMetadataBuilder
from weavelm.ops.cache_write import reshape_and_cache, triton_unavailable_reasons
from weavelm.ops.kv_quant import is_fp8

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: Triton's fp8 conversions
MAX_HEAD_SIZE = 256


def _kernels():
    from weavelm.plugins.attention.triton import kernels
    return kernels


class TritonOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_splits: int = Field(0, ge=0, le=64, description="Split-KV partitions for decode-only batches: a power of "
                            "two, or 0 to choose from the batch size and the number of multiprocessors.")

    @field_validator("num_splits")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"must be 0 or a power of two (got {v})")
        return v


@dataclass
class TritonAttentionMetadata:
    """The common metadata plus what the kernels' launch choices need; one per step, shared by every layer."""

    common: CommonAttentionMetadata
    decode_only: bool
    num_sms: int
    forced_splits: int = 0
    _configs: dict[int, dict] = field(default_factory=dict, repr=False)

    def launch_config(self, num_kv_heads: int) -> dict:
        cfg = self._configs.get(num_kv_heads)
        if cfg is None:
            c = self.common
            cfg = _kernels().select_config(self.decode_only, c.num_reqs, c.max_query_len, c.max_seq_len,
                                           num_kv_heads, self.num_sms, self.forced_splits)
            self._configs[num_kv_heads] = cfg
        return cfg


class TritonMetadataBuilder(AttentionMetadataBuilder):
    """Reads only Python ints of the common metadata. For CUDA-graph capture, build the capture batch's metadata
    with `max_seq_len` set to the longest context the graph will replay (e.g. max_model_len): the split-KV count
    chosen then is baked into the graph (any count is correct; it only tunes speed)."""

    def __init__(self, device: torch.device, forced_splits: int = 0):
        self.forced_splits = forced_splits
        device = torch.device(device)
        self.num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                        if device.type == "cuda" else 4)

    def build(self, common: CommonAttentionMetadata) -> TritonAttentionMetadata:
        return TritonAttentionMetadata(common, decode_only=common.max_query_len <= 1, num_sms=self.num_sms,
                                       forced_splits=self.forced_splits)


class TritonAttentionImpl(AttentionImpl):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: Any) -> torch.Tensor:
        kernels = _kernels()
        if isinstance(metadata, CommonAttentionMetadata):
            metadata = TritonMetadataBuilder(q.device).build(metadata)
        common = metadata.common
        n = q.shape[0]
        q3 = q.view(n, self.num_heads, self.head_size)
        out = torch.empty(n, self.num_heads, self.head_size, dtype=q.dtype, device=q.device)
        reshape_and_cache(k.view(n, self.num_kv_heads, self.head_size),
                                  v.view(n, self.num_kv_heads, self.head_size), kv_cache[0], kv_cache[1],
                                  common.slot_mapping, out, common.query_start_loc, common.num_reqs,
                                  self.k_scale, self.v_scale)
        if n > common.slot_mapping.shape[0]:  # rows beyond slot_mapping are padding the cache kernel never saw
            out[common.slot_mapping.shape[0]:].zero_()
        kernels.paged_attention(q3, kv_cache[0], kv_cache[1], out, common.block_table, common.seq_lens,
                                common.query_start_loc, common.num_reqs, self.scale,
                                sliding_window=self.sliding_window, k_scale=self.k_scale, v_scale=self.v_scale,
                                **metadata.launch_config(self.num_kv_heads))
        return out.view(n, self.num_heads * self.head_size)


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    description = "Paged attention in Triton: mixed prefill/decode kernel, split-KV decode, fused cache write."
    priority = 20
    Options = TritonOptions
    graph_safe = True
    checks_kv_cache_dtype = True  # fp8 caches: quantized by the cache write, converted as the kernel loads them

    def __init__(self, options: BaseModel | None = None):
        super().__init__(options if options is not None else TritonOptions())

    @classmethod
    def check(cls, spec: AttentionSpec) -> list[str]:
        reasons = triton_unavailable_reasons(spec.device)
        if spec.dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {spec.dtype} is not supported (float16, bfloat16, float32)")
        if spec.head_size % 16 or not 16 <= spec.head_size <= MAX_HEAD_SIZE:
            reasons.append(f"head_size {spec.head_size} is not supported (a multiple of 16 up to {MAX_HEAD_SIZE})")
        if spec.num_heads % spec.num_kv_heads:
            reasons.append(f"num_heads ({spec.num_heads}) must be a multiple of num_kv_heads ({spec.num_kv_heads})")
        if spec.block_size < 1:
            reasons.append(f"block_size {spec.block_size} must be >= 1")
        if spec.device != "cuda" and spec.dtype == torch.bfloat16:
            reasons.append("bfloat16 under the Triton CPU interpreter: it has no bf16 tl.dot (triton-lang/triton#11584)")
        kv_dtype = spec.kv_cache_dtype or spec.dtype
        if kv_dtype != spec.dtype and not is_fp8(kv_dtype):
            reasons.append(f"kv_cache_dtype {kv_dtype}: the cache is kept in the model's dtype or in fp8")
        if is_fp8(kv_dtype) and spec.device == "cuda" and torch.cuda.is_available() and \
                torch.cuda.get_device_capability() < FP8_MIN_CAPABILITY:
            reasons.append(f"kv_cache_dtype {kv_dtype}: Triton converts fp8 on sm_89 and newer only; this GPU is "
                           f"sm_{''.join(map(str, torch.cuda.get_device_capability()))}")
        return reasons

    @classmethod
    def auto_check(cls, spec: AttentionSpec) -> list[str]:
        reasons = cls.check(spec)
        if spec.device != "cuda":
            reasons.append("the Triton CPU interpreter is for tests; name `attention: triton` to use it")
        return reasons

    def make_builder(self, device: torch.device) -> TritonMetadataBuilder:
        return TritonMetadataBuilder(device, getattr(self.options, "num_splits", 0))

    def make_impl(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float,
                  sliding_window: int | None = None) -> AttentionImpl:
        return TritonAttentionImpl(num_heads, num_kv_heads, head_size, scale, sliding_window)


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("attention", TritonAttentionBackend.name, TritonAttentionBackend)
