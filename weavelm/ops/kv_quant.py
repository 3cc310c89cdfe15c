"""The KV cache's storage dtype (`cache.kv_cache_dtype`, vLLM's names) and the fp8 quantize / dequantize that every
attention backend keeping an fp8 cache shares: a key is stored as `saturate(k / k_scale)` in fp8 and read back as
`fp8 * k_scale` (values likewise with `v_scale`), the per-layer scales defaulting to 1.0 as in vLLM (the engine does
not read checkpoint scales yet, so it always runs at 1.0).
"""

from __future__ import annotations

import torch

# vLLM's `kv_cache_dtype` names weavelm implements -> the storage dtype ("auto": the model's dtype, None here)
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "fp8": torch.float8_e4m3fn,  # vLLM's "fp8" is e4m3 on CUDA
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def kv_cache_torch_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype KV cache tensors are allocated in for `cache.kv_cache_dtype` = `name` (validated by the config)."""
    dtype = KV_CACHE_DTYPES[name]
    return model_dtype if dtype is None else dtype


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of an fp8 dtype (448 for e4m3fn, 57344 for e5m2): quantized values saturate to it."""
    return float(torch.finfo(dtype).max)


def quantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """`x / scale` (in fp32, as `x * (1 / scale)`) saturated to `dtype`'s range and rounded to nearest-even in
    `dtype` (fp8); any other dtype is a plain cast."""
    if not is_fp8(dtype):
        return x.to(dtype)
    limit = fp8_max(dtype)
    return (x.float() * (1.0 / scale)).clamp_(-limit, limit).to(dtype)  # as the Triton write: times the inverse


def dequantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """fp8 cache contents `x` as `dtype` values (`x * scale`); a cache already in `dtype` is returned as it is."""
    if not is_fp8(x.dtype):
        return x if x.dtype == dtype else x.to(dtype)
    out = x.to(torch.float32)
    if scale != 1.0:
        out.mul_(scale)
    return out.to(dtype)
