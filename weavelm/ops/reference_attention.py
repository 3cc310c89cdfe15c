"""The readable specification of paged attention: what every attention backend's output must equal.

Used by the `torch_ref` backend and by the attention contract suite in `weavelm.testing` (which may not import a
plugin module), so the reference lives here, beside the shared cache write.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from weavelm.ops.kv_quant import dequantize_kv

if TYPE_CHECKING:
    from weavelm.core.forward import CommonAttentionMetadata


def paged_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, meta: CommonAttentionMetadata,
                        scale: float, sliding_window: int | None = None, k_scale: float = 1.0,
                        v_scale: float = 1.0) -> torch.Tensor:
    """Causal attention of each request's new tokens over its context, read from the paged cache.

    q: (num_actual_tokens, num_heads, head_size), request i's rows at `query_start_loc[i]:query_start_loc[i + 1]`;
    kv_cache: (2, num_blocks, block_size, num_kv_heads, head_size) already holding this step's keys and values;
    returns (num_actual_tokens, num_heads, head_size) in q's dtype. Request i's new tokens are the last ones of its
    `seq_lens[i]` positions, so query j of a request of query length L sees positions `<= seq_len - L + j`, and
    with a `sliding_window` w only the last w of them (`> seq_len - L + j - w`). Blocks wholly before the first
    query's window are never read (the scheduler may have freed them).
    An fp8 cache is read as `k * k_scale` / `v * v_scale` (`weavelm.ops.kv_quant`).
    One request at a time, in fp32, reading only host copies of the offsets (no device sync).
    """
    num_heads = q.shape[1]
    num_kv_heads, head_size = kv_cache.shape[-2], kv_cache.shape[-1]
    block_size = kv_cache.shape[2]
    out = torch.empty_like(q)
    query_start_loc = meta.query_start_loc_cpu.tolist()
    seq_lens = meta.seq_lens_cpu.tolist()
    for i in range(meta.num_reqs):
        start, end, seq_len = query_start_loc[i], query_start_loc[i + 1], seq_lens[i]
        if end == start:
            continue
        num_blocks = (seq_len + block_size - 1) // block_size
        first = 0 if sliding_window is None else max(0, seq_len - (end - start) - sliding_window + 1) // block_size
        lo = first * block_size  # position of the first key read
        blocks = meta.block_table[i, first:num_blocks].long()
        k = dequantize_kv(kv_cache[0, blocks], k_scale, torch.float32).reshape(-1, num_kv_heads, head_size)
        v = dequantize_kv(kv_cache[1, blocks], v_scale, torch.float32).reshape(-1, num_kv_heads, head_size)
        k, v = k[:seq_len - lo], v[:seq_len - lo]
        if num_heads != num_kv_heads:
            k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
            v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        qi = q[start:end].transpose(0, 1).float()  # (heads, q_len, head)
        scores = torch.matmul(qi, k.transpose(0, 1).float().transpose(1, 2)) * scale  # (heads, q_len, keys)
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)
        k_pos = torch.arange(lo, seq_len, device=q.device)
        mask = k_pos[None, :] > q_pos[:, None]
        if sliding_window is not None:
            mask |= k_pos[None, :] <= q_pos[:, None] - sliding_window
        scores.masked_fill_(mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.matmul(probs, v.transpose(0, 1).float()).transpose(0, 1).to(q.dtype)
    return out
