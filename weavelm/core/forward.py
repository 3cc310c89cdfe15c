"""Per-forward data handed explicitly to models and attention backends (no global forward context)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class AttentionSpec:
    """What a backend needs to know to say whether it can run (`AttentionBackend.check`).

    `sliding_window`: the smallest window of any layer when some layers attend only to their last `sliding_window`
    keys (a query at position p sees keys p - sliding_window + 1 .. p, as transformers' and flash-attn's
    `window_size=(sliding_window - 1, 0)`); None when every layer sees its whole context. A backend that cannot
    apply a per-layer window returns a reason from `check` when it is set; the engine then never uses it.

    `kv_cache_dtype`: the dtype the KV cache is allocated in when it differs from `dtype` (`cache.kv_cache_dtype`:
    `torch.float8_e4m3fn` or `torch.float8_e5m2`); None: the model's dtype. A backend whose `check` does not
    accept it is refused (`AttentionBackend.checks_kv_cache_dtype`).
    """

    device: str  # "cpu" | "cuda"
    dtype: torch.dtype
    head_size: int
    num_heads: int
    num_kv_heads: int
    block_size: int
    sliding_window: int | None = None
    kv_cache_dtype: torch.dtype | None = None


def smallest_window(windows: list[int | None]) -> int | None:
    """The `AttentionSpec.sliding_window` of a model whose layer i has window `windows[i]` (None: full)."""
    sized = [w for w in windows if w is not None]
    return min(sized) if sized else None


def kv_window(windows: list[int | None]) -> int | None:
    """How many trailing positions any layer can still read (None: some layer reads the whole context), so KV
    blocks wholly before a request's last `kv_window` positions may be freed. One block table serves every layer,
    so a model with one full-attention layer frees nothing."""
    if not windows or any(w is None for w in windows):
        return None
    return max(windows)


def make_layer_impl(backend: Any, num_heads: int, num_kv_heads: int, head_size: int, window: int | None) -> Any:
    """One layer's attention impl (scale head_size ** -0.5); `sliding_window` is passed only to windowed layers,
    so backends written before windows keep working for models without them."""
    scale = head_size ** -0.5
    if window is None:
        return backend.make_impl(num_heads, num_kv_heads, head_size, scale)
    return backend.make_impl(num_heads, num_kv_heads, head_size, scale, sliding_window=window)


@dataclass
class CommonAttentionMetadata:
    """Backend-independent description of one flattened batch. Requests are ordered as in the batch rows.

    query_start_loc: (num_reqs + 1,) int32 on device, offsets of each request's new tokens in the flat batch
    seq_lens:        (num_reqs,) int32 on device, context length after this step (cached + new tokens)
    block_table:     (num_reqs, max_blocks_per_req) int32 on device, KV block ids (padding is 0)
    slot_mapping:    (num_tokens,) int64 on device, cache slot (block * block_size + offset) of each new token
    query_start_loc_cpu / seq_lens_cpu: (num_reqs + 1,) / (num_reqs,) int32 on the host, equal to the device
                     tensors in eager steps, so reference code needs no device sync. Under CUDA-graph capture they
                     describe the batch captured, not a later replay: graph-safe backends must not read them.
    num_reqs / num_actual_tokens: requests and real (unpadded) tokens of the step; tensors may be padded beyond.
    max_query_len / max_seq_len: the largest new-token count and context length of any request this step.
    """

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu: torch.Tensor
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    block_size: int


@dataclass
class ForwardBatch:
    """Everything a model's forward needs besides token ids and positions.

    `kv_caches[i]` is layer i's cache in the backend's `kv_cache_shape`; `attn_metadata` is what the backend's
    builder made from the common metadata; `attn_impls[i]` runs layer i's attention.
    """

    attn_metadata: Any
    kv_caches: list[torch.Tensor]
    attn_impls: list[Any]
