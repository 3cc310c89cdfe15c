"""`attention: sdpa`: one `torch.nn.functional.scaled_dot_product_attention` call per layer over the paged cache.

Per step, the metadata builder turns the flat batch into a padded one, once for all layers:

- `gather_slots` (num_reqs, max_seq_len): the cache slot of every context position of every request, read through
  its block table (positions past a request's length point at slot 0 and are masked out);
- `query_rows` (num_reqs, max_query_len): the flat row of each request's j-th new token;
- `mask` (num_reqs, 1, max_query_len, max_seq_len): causal with a cached prefix, i.e. query j of a request with
  `context_len` cached tokens sees key positions `<= context_len + j`;
- `token_req` / `token_col` (num_actual_tokens,): where each flat row sits in the padded output.

A layer with a sliding window w (Mistral, Qwen2's upper layers) also hides keys at or before `position - w`: its
mask is `window_mask(w)`, made once per step and window. The gather still reads every position (those out of the
window are masked; their blocks may have been freed and reused, and hold other requests' finite values).

Each layer then writes its new K/V into the cache, gathers its keys and values into (num_reqs, max_seq_len,
kv_heads, head) tensors, runs SDPA once (grouped-query heads through `enable_gqa`), and scatters the rows back.
No per-request Python loop; the cost is the padding, so a batch mixing one long context with many short ones reads
num_reqs * max_seq_len positions. Shapes change every step, so the backend is not CUDA-graph safe.

Imports only `weavelm.plugin` (the public plugin API) and torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from weavelm.plugin import (AttentionBackend, AttentionImpl, AttentionMetadataBuilder, AttentionSpec,
                            CommonAttentionMetadata, hookimpl, write_kv_cache)

WEAVELM_API_VERSION = "2.3"  # the weavelm plugin API this module was written for
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class SdpaMetadata:
    """One step's padded view of the batch, shared by every layer. Shapes as in the module docstring."""

    slot_mapping: torch.Tensor   # (num_actual_tokens,) int64: cache slot of each new token
    gather_slots: torch.Tensor   # (num_reqs, max_seq_len) int64
    query_rows: torch.Tensor     # (num_reqs, max_query_len) int64
    mask: torch.Tensor           # (num_reqs, 1, max_query_len, max_seq_len) bool, True = attend
    token_req: torch.Tensor      # (num_actual_tokens,) int64
    token_col: torch.Tensor      # (num_actual_tokens,) int64
    num_actual_tokens: int
    query_pos: torch.Tensor      # (num_reqs, max_query_len) int64: position of each padded query
    window_masks: dict = field(default_factory=dict)  # window -> mask like `mask`, built on first use

    def window_mask(self, window: int | None) -> torch.Tensor:
        if window is None:
            return self.mask
        if window not in self.window_masks:
            key_pos = torch.arange(self.mask.shape[-1], device=self.mask.device)
            in_window = key_pos[None, None, :] > self.query_pos[:, :, None] - window
            self.window_masks[window] = self.mask & in_window[:, None]
        return self.window_masks[window]


class SdpaMetadataBuilder(AttentionMetadataBuilder):
    """Called by the runner once per step; every layer's `forward` reuses what it returns."""

    def __init__(self, device: torch.device):
        self.device = device

    def build(self, common: CommonAttentionMetadata) -> SdpaMetadata:
        num_reqs, num_tokens = common.num_reqs, common.num_actual_tokens
        query_start_loc = common.query_start_loc[: num_reqs + 1].long()
        seq_lens = common.seq_lens[:num_reqs].long()
        query_lens = query_start_loc[1:] - query_start_loc[:-1]
        context_lens = seq_lens - query_lens

        key_pos = torch.arange(common.max_seq_len, device=self.device)
        block_col = (key_pos // common.block_size).clamp(max=common.block_table.shape[1] - 1)
        blocks = common.block_table[:num_reqs, block_col].long()                 # (num_reqs, max_seq_len)
        in_context = key_pos[None, :] < seq_lens[:, None]
        gather_slots = torch.where(in_context, blocks * common.block_size + key_pos % common.block_size, 0)

        query_col = torch.arange(common.max_query_len, device=self.device)
        query_rows = (query_start_loc[:-1, None] + query_col[None, :]).clamp(max=max(num_tokens - 1, 0))
        # rows past a request's query length see a prefix too (never an all-masked row, so never NaN); discarded
        query_pos = context_lens[:, None] + query_col[None, :]
        mask = key_pos[None, None, :] <= query_pos[:, :, None]

        token_req = torch.repeat_interleave(torch.arange(num_reqs, device=self.device), query_lens,
                                            output_size=num_tokens)
        token_col = torch.arange(num_tokens, device=self.device) - query_start_loc[token_req]
        return SdpaMetadata(common.slot_mapping[:num_tokens], gather_slots, query_rows, mask[:, None],
                            token_req, token_col, num_tokens, query_pos)


class SdpaImpl(AttentionImpl):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: SdpaMetadata) -> torch.Tensor:
        num_rows, n = q.shape[0], metadata.num_actual_tokens
        q = q.view(num_rows, self.num_heads, self.head_size)
        k = k.view(num_rows, self.num_kv_heads, self.head_size)
        v = v.view(num_rows, self.num_kv_heads, self.head_size)
        write_kv_cache(k, v, kv_cache, metadata.slot_mapping)
        slots = kv_cache.view(2, -1, self.num_kv_heads, self.head_size)
        keys = slots[0][metadata.gather_slots].transpose(1, 2)      # (num_reqs, kv_heads, max_seq_len, head)
        values = slots[1][metadata.gather_slots].transpose(1, 2)
        queries = q[metadata.query_rows].transpose(1, 2)            # (num_reqs, heads, max_query_len, head)
        padded = F.scaled_dot_product_attention(queries, keys, values, attn_mask=metadata.window_mask(self.sliding_window), scale=self.scale,
                                                enable_gqa=self.num_heads != self.num_kv_heads)
        out = padded.transpose(1, 2)[metadata.token_req, metadata.token_col]  # (num_actual_tokens, heads, head)
        if n < num_rows:
            out = torch.cat([out, out.new_zeros(num_rows - n, *out.shape[1:])])
        return out.reshape(num_rows, self.num_heads * self.head_size)


class SdpaBackend(AttentionBackend):
    name = "sdpa"
    description = "torch scaled_dot_product_attention over the paged cache, one call per layer (example plugin)."
    priority = -10  # below every built-in: `attention: auto` never picks it; name it to use it

    @classmethod
    def check(cls, spec: AttentionSpec) -> list[str]:
        reasons = []
        if spec.num_heads % spec.num_kv_heads:
            reasons.append(f"num_heads ({spec.num_heads}) must be a multiple of num_kv_heads ({spec.num_kv_heads})")
        if spec.dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {spec.dtype} is not supported (float32, float16, bfloat16)")
        return reasons

    def make_builder(self, device: torch.device) -> SdpaMetadataBuilder:
        return SdpaMetadataBuilder(device)

    def make_impl(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float,
                  sliding_window: int | None = None) -> AttentionImpl:
        return SdpaImpl(num_heads, num_kv_heads, head_size, scale, sliding_window)


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("attention", SdpaBackend.name, SdpaBackend)
