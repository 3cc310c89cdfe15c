"""Hand-built attention batches for the attention backend tests and benchmarks (no runner involved)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weavelm.core.forward import CommonAttentionMetadata
from weavelm.ops.cache_write import write_kv_cache
from weavelm.plugins.attention.torch_ref import paged_attention_ref


@dataclass
class AttentionBatch:
    q: torch.Tensor          # (num_tokens, num_heads * head)
    k: torch.Tensor          # (num_tokens, num_kv_heads * head)
    v: torch.Tensor
    kv_cache: torch.Tensor   # (2, num_blocks, block_size, num_kv_heads, head), cached prefixes already written
    meta: CommonAttentionMetadata
    num_heads: int
    num_kv_heads: int
    head_size: int

    @property
    def scale(self) -> float:
        return self.head_size ** -0.5


def make_batch(query_lens: list[int], context_lens: list[int], *, num_heads: int, num_kv_heads: int,
               head_size: int, block_size: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
               pad_tokens: int = 0, spare_blocks: int = 3, seed: int = 0) -> AttentionBatch:
    """Requests with `context_lens[i]` cached tokens (random, already in the cache) and `query_lens[i]` new ones.

    Blocks are handed out in shuffled order so block tables are not contiguous; `pad_tokens` extra rows with
    slot -1 imitate CUDA-graph padding (num_tokens > num_actual_tokens).
    """
    g = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for q, c in zip(query_lens, context_lens)]
    nblocks = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(nblocks) + spare_blocks
    perm = torch.randperm(num_blocks, generator=g)
    max_blocks = max(nblocks) + 1
    block_table = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    slots, used = [], 0
    for i, (ql, cl) in enumerate(zip(query_lens, context_lens)):
        block_table[i, :nblocks[i]] = perm[used:used + nblocks[i]].to(torch.int32)
        used += nblocks[i]
        pos = torch.arange(cl, cl + ql)
        slots.append(block_table[i, pos // block_size].long() * block_size + pos % block_size)
    n = sum(query_lens)
    slot_mapping = torch.cat(slots + [torch.full((pad_tokens,), -1, dtype=torch.long)])
    qsl = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    sl = torch.tensor(seq_lens, dtype=torch.int32)

    gd = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):  # drawn on the device: benchmark caches hold gigabytes
        return torch.randn(*shape, generator=gd, device=device).to(dtype)

    rows = n + pad_tokens
    kv_cache = rnd(2, num_blocks, block_size, num_kv_heads, head_size)
    meta = CommonAttentionMetadata(
        query_start_loc=qsl.to(device), seq_lens=sl.to(device), block_table=block_table.to(device),
        slot_mapping=slot_mapping.to(device), query_start_loc_cpu=qsl, seq_lens_cpu=sl, num_reqs=len(seq_lens),
        num_actual_tokens=n, max_query_len=max(query_lens), max_seq_len=max(seq_lens), block_size=block_size)
    return AttentionBatch(rnd(rows, num_heads * head_size), rnd(rows, num_kv_heads * head_size),
                          rnd(rows, num_kv_heads * head_size), kv_cache, meta, num_heads, num_kv_heads, head_size)


def reference_output(b: AttentionBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """torch_ref's output for the real tokens (num_actual_tokens, heads*head) and the cache after the write."""
    n = b.meta.num_actual_tokens
    cache = b.kv_cache.clone()
    k = b.k[:n].view(n, b.num_kv_heads, b.head_size)
    v = b.v[:n].view(n, b.num_kv_heads, b.head_size)
    write_kv_cache(k, v, cache, b.meta.slot_mapping[:n])
    q = b.q[:n].view(n, b.num_heads, b.head_size)
    return paged_attention_ref(q, cache, b.meta, b.scale).reshape(n, -1), cache


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()
