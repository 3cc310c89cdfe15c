"""Hand-built attention batches (no runner involved) and the reference result for them.

Used by the attention contract suite, the repository's own attention tests and `benchmarks/attention_kernels.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weavelm.ops.cache_write import write_kv_cache
from weavelm.ops.reference_attention import paged_attention_ref
from weavelm.plugin import CommonAttentionMetadata
from weavelm.utils import cdiv


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
    blocks_per_req = [cdiv(s, block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + spare_blocks
    perm = torch.randperm(num_blocks, generator=g)
    block_table = torch.zeros(len(seq_lens), max(blocks_per_req) + 1, dtype=torch.int32)
    slots, used = [], 0
    for i, (query_len, context_len) in enumerate(zip(query_lens, context_lens)):
        block_table[i, :blocks_per_req[i]] = perm[used:used + blocks_per_req[i]].to(torch.int32)
        used += blocks_per_req[i]
        pos = torch.arange(context_len, context_len + query_len)
        slots.append(block_table[i, pos // block_size].long() * block_size + pos % block_size)
    num_tokens = sum(query_lens)
    slot_mapping = torch.cat(slots + [torch.full((pad_tokens,), -1, dtype=torch.long)])
    query_start_loc = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)

    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):  # drawn on the device: benchmark caches hold gigabytes
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    rows = num_tokens + pad_tokens
    kv_cache = rnd(2, num_blocks, block_size, num_kv_heads, head_size)
    meta = CommonAttentionMetadata(
        query_start_loc=query_start_loc.to(device), seq_lens=seq_lens_t.to(device),
        block_table=block_table.to(device), slot_mapping=slot_mapping.to(device),
        query_start_loc_cpu=query_start_loc, seq_lens_cpu=seq_lens_t, num_reqs=len(seq_lens),
        num_actual_tokens=num_tokens, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        block_size=block_size)
    return AttentionBatch(rnd(rows, num_heads * head_size), rnd(rows, num_kv_heads * head_size),
                          rnd(rows, num_kv_heads * head_size), kv_cache, meta, num_heads, num_kv_heads, head_size)


def reference_output(b: AttentionBatch, sliding_window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference output for the real tokens (num_actual_tokens, heads*head) and the cache after the write."""
    n = b.meta.num_actual_tokens
    cache = b.kv_cache.clone()
    k = b.k[:n].view(n, b.num_kv_heads, b.head_size)
    v = b.v[:n].view(n, b.num_kv_heads, b.head_size)
    write_kv_cache(k, v, cache, b.meta.slot_mapping[:n])
    q = b.q[:n].view(n, b.num_heads, b.head_size)
    return paged_attention_ref(q, cache, b.meta, b.scale, sliding_window).reshape(n, -1), cache


def blocks_outside_window(b: AttentionBatch, window: int) -> list[int]:
    """Ids of the blocks wholly before every query's window, per request: the blocks the scheduler may free (and
    hand to other requests) while their ids stay in the block table."""
    meta, bs = b.meta, b.meta.block_size
    starts, seq_lens = meta.query_start_loc_cpu.tolist(), meta.seq_lens_cpu.tolist()
    out = []
    for i in range(meta.num_reqs):
        first_query = seq_lens[i] - (starts[i + 1] - starts[i])
        num_outside = max(0, first_query - window + 1) // bs
        out += meta.block_table[i, :num_outside].tolist()
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of `out` against `ref`, in float64."""
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()
