"""Per-forward data handed explicitly to models and attention backends (no global forward context)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class AttentionSpec:
    """What a backend needs to know to say whether it can run (`AttentionBackend.check`)."""

    device: str  # "cpu" | "cuda"
    dtype: torch.dtype
    head_size: int
    num_heads: int
    num_kv_heads: int
    block_size: int


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
