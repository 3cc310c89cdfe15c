"""The readable reference attention backend every other backend is tested against."""

from __future__ import annotations

from typing import Any

import torch

from weavelm.core.forward import AttentionSpec
from weavelm.core.hookspecs import hookimpl
from weavelm.core.interfaces import AttentionBackend, AttentionImpl
from weavelm.ops.cache_write import write_kv_cache
from weavelm.ops.reference_attention import paged_attention_ref


class TorchRefImpl(AttentionImpl):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: Any) -> torch.Tensor:
        n = q.shape[0]
        q = q.view(n, self.num_heads, self.head_size)
        k = k.view(n, self.num_kv_heads, self.head_size)
        v = v.view(n, self.num_kv_heads, self.head_size)
        write_kv_cache(k, v, kv_cache, metadata.slot_mapping, self.k_scale, self.v_scale)
        out = paged_attention_ref(q[: metadata.num_actual_tokens], kv_cache, metadata, self.scale,
                                  self.sliding_window, self.k_scale, self.v_scale)
        if out.shape[0] < n:
            out = torch.cat([out, out.new_zeros(n - out.shape[0], *out.shape[1:])])
        return out.reshape(n, self.num_heads * self.head_size)


class TorchRefBackend(AttentionBackend):
    name = "torch_ref"
    description = "Reference paged attention in plain PyTorch (one request at a time); any device, any dtype."
    priority = 0
    checks_kv_cache_dtype = True  # any cache dtype: written with a cast (fp8: scaled, saturated), read in fp32

    @classmethod
    def check(cls, spec: AttentionSpec) -> list[str]:
        if spec.num_heads % spec.num_kv_heads:
            return [f"num_heads ({spec.num_heads}) must be a multiple of num_kv_heads ({spec.num_kv_heads})"]
        return []

    def make_impl(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float,
                  sliding_window: int | None = None) -> AttentionImpl:
        return TorchRefImpl(num_heads, num_kv_heads, head_size, scale, sliding_window)


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("attention", TorchRefBackend.name, TorchRefBackend)
