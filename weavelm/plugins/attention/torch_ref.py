"""The readable reference attention backend every other backend is tested against."""

from __future__ import annotations

from typing import Any

import torch

from weavelm.core.forward import AttentionSpec, CommonAttentionMetadata
from weavelm.core.hookspecs import hookimpl
from weavelm.core.interfaces import AttentionBackend, AttentionImpl
from weavelm.ops.cache_write import write_kv_cache


def paged_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, meta: CommonAttentionMetadata,
                        scale: float) -> torch.Tensor:
    """q: (num_tokens, heads, head); returns (num_tokens, heads, head). One request at a time, in fp32."""
    num_heads = q.shape[1]
    num_kv_heads, head_size = kv_cache.shape[-2], kv_cache.shape[-1]
    block_size = kv_cache.shape[2]
    out = torch.empty_like(q)
    qsl = meta.query_start_loc_cpu.tolist()
    seq_lens = meta.seq_lens_cpu.tolist()
    for i in range(meta.num_reqs):
        start, end, seq_len = qsl[i], qsl[i + 1], seq_lens[i]
        if end == start:
            continue
        nblocks = (seq_len + block_size - 1) // block_size
        blocks = meta.block_table[i, :nblocks].long()
        k = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_size)[:seq_len]
        v = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_size)[:seq_len]
        if num_heads != num_kv_heads:
            k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
            v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        qi = q[start:end].transpose(0, 1).float()  # (heads, q_len, head)
        scores = torch.matmul(qi, k.transpose(0, 1).float().transpose(1, 2)) * scale  # (heads, q_len, seq_len)
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] > q_pos[:, None]
        scores.masked_fill_(mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.matmul(probs, v.transpose(0, 1).float()).transpose(0, 1).to(q.dtype)
    return out


class TorchRefImpl(AttentionImpl):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: Any) -> torch.Tensor:
        n = q.shape[0]
        q = q.view(n, self.num_heads, self.head_size)
        k = k.view(n, self.num_kv_heads, self.head_size)
        v = v.view(n, self.num_kv_heads, self.head_size)
        write_kv_cache(k, v, kv_cache, metadata.slot_mapping)
        out = paged_attention_ref(q[: metadata.num_actual_tokens], kv_cache, metadata, self.scale)
        if out.shape[0] < n:
            out = torch.cat([out, out.new_zeros(n - out.shape[0], *out.shape[1:])])
        return out.reshape(n, self.num_heads * self.head_size)


class TorchRefBackend(AttentionBackend):
    name = "torch_ref"
    description = "Reference paged attention in plain PyTorch (one request at a time); any device, any dtype."

    @classmethod
    def check(cls, spec: AttentionSpec) -> list[str]:
        if spec.num_heads % spec.num_kv_heads:
            return [f"num_heads ({spec.num_heads}) must be a multiple of num_kv_heads ({spec.num_kv_heads})"]
        return []

    def make_impl(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float) -> AttentionImpl:
        return TorchRefImpl(num_heads, num_kv_heads, head_size, scale)


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("attention", TorchRefBackend.name, TorchRefBackend)
