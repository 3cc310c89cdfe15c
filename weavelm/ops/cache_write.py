"""Writing new keys and values into the paged KV cache: a Triton kernel (CUDA, or the CPU interpreter) and the
readable torch version. Shared by every attention backend that keeps the default cache layout, so no backend
imports another.

Imported lazily (triton only inside `reshape_and_cache`), so importing this module never imports triton.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from weavelm.ops.kv_quant import is_fp8, quantize_kv


def triton_unavailable_reasons(device: str) -> list[str]:
    """Why Triton kernels cannot run on `device` here (empty: they can)."""
    if importlib.util.find_spec("triton") is None:
        return ["triton is not installed (pip install triton)"]
    if device != "cuda" and os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
        return [f"device {device!r}: Triton kernels need CUDA (or TRITON_INTERPRET=1 for the CPU interpreter)"]
    return []


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Scatter new keys/values (num_tokens, kv_heads, head) into a (2, blocks, block_size, kv_heads, head) cache
    at `slot_mapping` (num_tokens,) int64; rows past `slot_mapping`'s length (padding) are ignored. An fp8 cache
    stores `k / k_scale` and `v / v_scale`, saturated (`weavelm.ops.kv_quant`)."""
    n = slot_mapping.shape[0]
    flat = kv_cache.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])
    if not is_fp8(kv_cache.dtype):
        flat[0].index_copy_(0, slot_mapping, k[:n].to(kv_cache.dtype))
        flat[1].index_copy_(0, slot_mapping, v[:n].to(kv_cache.dtype))
        return
    raw = flat.view(torch.uint8)  # torch has no fp8 index_copy on the CPU; the bytes are the same
    raw[0].index_copy_(0, slot_mapping, quantize_kv(k[:n], k_scale, kv_cache.dtype).view(torch.uint8))
    raw[1].index_copy_(0, slot_mapping, quantize_kv(v[:n], v_scale, kv_cache.dtype).view(torch.uint8))


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, out: torch.Tensor | None = None,
                      query_start_loc: torch.Tensor | None = None, num_reqs: int = 0, k_scale: float = 1.0,
                      v_scale: float = 1.0) -> None:
    """The Triton cache write (see `triton_cache_write.reshape_and_cache`); imports triton on first call."""
    from weavelm.ops.triton_cache_write import reshape_and_cache as kernel_launch
    kernel_launch(key, value, k_cache, v_cache, slot_mapping, out, query_start_loc, num_reqs, k_scale, v_scale)
