"""The `cpu` attention backend: the whole batch in one `scaled_dot_product_attention` call per layer.

The builder runs once per step (not per layer): it turns the block tables into one gather index over the paged
cache, `(num_reqs, max_blocks * block_size)`, the padded query index `(num_reqs, max_query_len)`, and the boolean
mask (padding and causality) that SDPA takes. Each layer then writes its new K/V, gathers every request's context
with one `index_select`, and runs SDPA over the padded batch (grouped-query heads through `enable_gqa`), with no
Python loop over requests. A pure decode step (every query length 1) skips the query padding.

With fp32 tensors and weavelm's native CPU kernels (`weavelm.ops.native`), a step whose queries are short (decode,
speculative verification, small chunks: `max_query_len <= NATIVE_MAX_QUERY_LEN`) instead runs one native call per
layer that writes the new keys/values and attends straight over the paged blocks: no gather, no mask, no padding.
The builder then skips the SDPA index and mask (built on demand if a layer still needs them, e.g. bf16).

An fp8 KV cache (`cache.kv_cache_dtype: fp8`) takes the SDPA path (the native kernels read fp32 caches only): each
layer gathers its context's fp8 rows and dequantizes them to the query dtype before SDPA.

A layer with a sliding window gathers only the positions its queries can see (`window + max_query_len - 1` per
request, one index and mask per window per step) and masks the window's edge; the native kernel takes the window
itself (it reads only the window's keys), but the whole-stack native path (native_stack.py) is not used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from weavelm.core.forward import AttentionSpec, CommonAttentionMetadata
from weavelm.core.hookspecs import hookimpl
from weavelm.core.interfaces import AttentionBackend, AttentionImpl, AttentionMetadataBuilder
from weavelm.ops import native
from weavelm.ops.cache_write import write_kv_cache
from weavelm.ops.kv_quant import dequantize_kv

NATIVE_MAX_QUERY_LEN = 32  # longer queries (prefill) go to SDPA's blocked kernel


@dataclass
class CpuAttentionMetadata:
    """slot_mapping: (num_tokens,) int64; kv_index: (num_reqs * ctx_len,) int64 flat cache rows of each request's
    context (ctx_len = max_blocks * block_size, the padding pointing at real rows that the mask hides);
    query_index: (num_reqs, max_query_len) int64 flat token of each padded query (None for a pure decode step);
    query_valid: (num_reqs * max_query_len,) bool, the padded queries that exist (None for decode);
    mask: (num_reqs, 1, max_query_len, ctx_len) bool, True where a query may attend;
    query_pos: (num_reqs, max_query_len) int64 position of each padded query;
    batch: the step's common metadata (sliding-window layers gather from it, `context(window)`)."""

    slot_mapping: torch.Tensor
    kv_index: torch.Tensor | None
    query_index: torch.Tensor | None
    query_valid: torch.Tensor | None
    mask: torch.Tensor | None
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    ctx_len: int  # 0 until `sdpa_fields` when the builder left the SDPA fields out
    common: CommonAttentionMetadata | None = None  # set when the native kernel may take the step
    query_pos: torch.Tensor | None = None
    batch: CommonAttentionMetadata | None = None
    _windows: dict[int, ContextView] = field(default_factory=dict, repr=False)

    def sdpa_fields(self) -> CpuAttentionMetadata:
        """The SDPA index and mask, built on first need when the builder skipped them."""
        if self.kv_index is None:
            full = CpuAttentionBuilder().build_sdpa(self.common)
            self.kv_index, self.query_index, self.query_valid, self.mask, self.ctx_len, self.query_pos = \
                full.kv_index, full.query_index, full.query_valid, full.mask, full.ctx_len, full.query_pos
            self.batch = self.common
        return self

    def context(self, window: int | None) -> ContextView:
        """What a layer gathers and how it masks: every request's whole context, or for a sliding window only the
        `window + max_query_len - 1` positions its queries can see (made once per step and window; positions
        before them, whose blocks may have been freed, are never read)."""
        if window is None:
            return ContextView(self.kv_index, self.ctx_len, self.mask)
        view = self._windows.get(window)
        if view is None:
            view = self._windows[window] = _window_view(self, window)
        return view


@dataclass
class ContextView:
    """kv_index: (num_reqs * ctx_len,) int64 cache rows gathered per request; mask: (num_reqs, 1, max_query_len,
    ctx_len) bool."""

    kv_index: torch.Tensor
    ctx_len: int
    mask: torch.Tensor


def _window_view(m: CpuAttentionMetadata, window: int) -> ContextView:
    c, n = m.batch, m.num_reqs
    bs = c.block_size
    seq_lens = c.seq_lens[:n].long()
    q_lens = c.query_start_loc[1:n + 1].long() - c.query_start_loc[:n].long()
    span = window + m.max_query_len - 1
    first = (seq_lens - q_lens - window + 1).clamp(min=0)  # each request's first visible key
    key_pos = first[:, None] + torch.arange(span, device=first.device)  # (num_reqs, span)
    in_context = key_pos < seq_lens[:, None]
    read_pos = torch.minimum(key_pos, seq_lens[:, None] - 1)  # past the context: its last key, masked
    blocks = c.block_table[:n].long().gather(1, read_pos // bs)
    kv_index = (blocks * bs + read_pos % bs).reshape(-1)
    q_pos = m.query_pos[:, :, None]
    mask = in_context[:, None, :] & (key_pos[:, None, :] <= q_pos) & (key_pos[:, None, :] > q_pos - window)
    if m.query_valid is not None:  # padded queries attend somewhere (no all-masked row), then are dropped
        mask[:, :, 0] |= ~m.query_valid.view(n, m.max_query_len)
    return ContextView(kv_index, span, mask[:, None])


class CpuAttentionBuilder(AttentionMetadataBuilder):
    def build(self, common: CommonAttentionMetadata) -> CpuAttentionMetadata:
        if common.max_query_len <= NATIVE_MAX_QUERY_LEN and common.block_table.device.type == "cpu" \
                and native.available():
            return CpuAttentionMetadata(common.slot_mapping, kv_index=None, query_index=None, query_valid=None,
                                        mask=None, num_reqs=common.num_reqs,
                                        num_actual_tokens=common.num_actual_tokens,
                                        max_query_len=common.max_query_len, ctx_len=0, common=common)
        return self.build_sdpa(common)

    def build_sdpa(self, common: CommonAttentionMetadata) -> CpuAttentionMetadata:
        n, bs = common.num_reqs, common.block_size
        max_blocks = (common.max_seq_len + bs - 1) // bs
        ctx_len = max_blocks * bs
        table = common.block_table[:n, :max_blocks].long()
        kv_index = (table[:, :, None] * bs + torch.arange(bs, device=table.device)).reshape(-1)
        seq_lens = common.seq_lens[:n].long()
        start = common.query_start_loc[:n].long()
        q_lens = common.query_start_loc[1:n + 1].long() - start
        max_q = common.max_query_len
        key_pos = torch.arange(ctx_len, device=table.device)
        q_off = torch.arange(max_q, device=table.device)
        # query i of a request sits at position seq_len - q_len + i and sees keys at positions <= that
        q_pos = (seq_lens - q_lens)[:, None] + q_off[None, :]
        mask = key_pos[None, None, :] <= q_pos[:, :, None]
        query_index = query_valid = None
        if max_q > 1:
            valid = q_off[None, :] < q_lens[:, None]
            query_index = torch.where(valid, start[:, None] + q_off[None, :], 0)
            query_valid = valid.reshape(-1)
            mask = mask & valid[:, :, None]
            mask[:, :, 0] |= ~valid  # padded queries attend somewhere (no all-masked row), then are dropped
        return CpuAttentionMetadata(common.slot_mapping, kv_index, query_index, query_valid, mask[:, None],
                                    n, common.num_actual_tokens, max_q, ctx_len, query_pos=q_pos, batch=common)


class CpuAttentionImpl(AttentionImpl):
    accepts_strided_qkv = True  # q, k, v may be column slices of one (T, q + 2 kv) buffer (the model skips copies)
    # a step whose metadata has `common` set runs `wl_paged_attention` on weavelm's default cache layout, so the
    # model may run the whole decoder stack natively (weavelm/plugins/models/native_stack.py)
    native_paged_attention = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__(num_heads, num_kv_heads, head_size, scale, sliding_window)
        if sliding_window is not None:
            self.native_paged_attention = False  # the native decoder stack knows no windows (the kernel does)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: Any) -> torch.Tensor:
        m: CpuAttentionMetadata = metadata
        n_tok, h, kvh, d = q.shape[0], self.num_heads, self.num_kv_heads, self.head_size
        if m.common is not None:
            c = m.common
            if native.usable(q, k, v, kv_cache) and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and \
                    native.attention_supported(h, kvh, d):
                return native.paged_attention(q, k, v, kv_cache, m.slot_mapping, c.query_start_loc, c.seq_lens,
                                              c.block_table, m.num_reqs, h, kvh, d, self.scale, self.sliding_window)
            m.sdpa_fields()
        write_kv_cache(k.reshape(n_tok, kvh, d), v.reshape(n_tok, kvh, d), kv_cache, m.slot_mapping, self.k_scale,
                       self.v_scale)
        ctx = m.context(self.sliding_window)
        flat = kv_cache.view(2, -1, kvh, d)
        shape = (m.num_reqs, ctx.ctx_len, kvh, d)
        keys = dequantize_kv(flat[0].index_select(0, ctx.kv_index), self.k_scale, q.dtype).view(shape).transpose(1, 2)
        values = dequantize_kv(flat[1].index_select(0, ctx.kv_index), self.v_scale, q.dtype).view(shape) \
            .transpose(1, 2)
        n = m.num_actual_tokens
        qh = q[:n].reshape(n, h, d)
        if m.query_index is None:
            queries = qh.view(m.num_reqs, 1, h, d)
        else:
            queries = qh[m.query_index.reshape(-1)].view(m.num_reqs, m.max_query_len, h, d)
        out = F.scaled_dot_product_attention(queries.transpose(1, 2), keys, values, attn_mask=ctx.mask,
                                             scale=self.scale, enable_gqa=h != kvh)
        out = out.transpose(1, 2).reshape(-1, h * d)
        if m.query_valid is not None:
            out = out[m.query_valid]
        if n < n_tok:
            out = torch.cat([out, out.new_zeros(n_tok - n, h * d)])
        return out


class CpuAttentionBackend(AttentionBackend):
    name = "cpu"
    description = "Batched paged attention for the CPU: one SDPA call per layer over gathered contexts."
    priority = 10
    checks_kv_cache_dtype = True  # an fp8 cache: written scaled and saturated, gathered and dequantized per layer

    @classmethod
    def check(cls, spec: AttentionSpec) -> list[str]:
        if spec.num_heads % spec.num_kv_heads:
            return [f"num_heads ({spec.num_heads}) must be a multiple of num_kv_heads ({spec.num_kv_heads})"]
        return []

    @classmethod
    def auto_check(cls, spec: AttentionSpec) -> list[str]:
        reasons = cls.check(spec)
        if spec.device != "cpu":
            reasons.append(f"auto picks it on the CPU only (device is {spec.device})")
        return reasons

    def make_builder(self, device: torch.device) -> AttentionMetadataBuilder:
        return CpuAttentionBuilder()

    def make_impl(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float,
                  sliding_window: int | None = None) -> AttentionImpl:
        return CpuAttentionImpl(num_heads, num_kv_heads, head_size, scale, sliding_window)


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("attention", CpuAttentionBackend.name, CpuAttentionBackend)
