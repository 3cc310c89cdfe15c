"""The Triton cache-write kernel (`weavelm.ops.cache_write` imports it at first use, never at plugin listing)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from weavelm.ops.kv_quant import fp8_max, is_fp8

FP8_MANTISSA_BITS = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}


@triton.jit
def _round_to_fp8_grid(x, MANT_DROP: tl.constexpr, MIN_NORMAL: tl.constexpr, SUBNORMAL_MAGIC: tl.constexpr):
    """x (fp32, saturated) rounded to nearest-even onto fp8's grid, so the fp8 conversion after it is exact: normal
    values in integer bits at fp8's mantissa width (the carry reaches the exponent), subnormal ones by adding and
    subtracting a magic number whose fp32 ulp is fp8's subnormal step. Only under the CPU interpreter, whose
    fp32 -> fp8 rounding loses that carry and truncates subnormals (1.97 becomes 1.0 in e4m3, triton 3.9); on the
    GPU the hardware conversion rounds."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + ((1 << (MANT_DROP - 1)) - 1) + ((bits >> MANT_DROP) & 1)) & ~((1 << MANT_DROP) - 1)
    tiny = (x + SUBNORMAL_MAGIC) - SUBNORMAL_MAGIC
    return tl.where(tl.abs(x) < MIN_NORMAL, tiny, bits.to(tl.float32, bitcast=True))


@triton.jit(do_not_specialize=["num_reqs"])
def _reshape_and_cache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, out_ptr, qsl_ptr, num_reqs, k_inv_scale, v_inv_scale,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cs, stride_ch, stride_ot,
    BLOCK_SIZE: tl.constexpr, HEAD: tl.constexpr, BLOCK_D: tl.constexpr,
    OUT_COLS: tl.constexpr, BLOCK_O: tl.constexpr, ZERO_PADDED: tl.constexpr, FP8_MAX: tl.constexpr,
    FP8_MANT_DROP: tl.constexpr, FP8_MIN_NORMAL: tl.constexpr, FP8_MAGIC: tl.constexpr,
):
    """Grid (num_tokens, num_kv_heads). Writes K/V of token t at slot_mapping[t] (skipped when < 0); an fp8 cache
    (FP8_MAX > 0) gets `k * k_inv_scale` saturated to +-FP8_MAX. With ZERO_PADDED also zeroes this head group's
    columns of out[t] for padded rows (t >= query_start_loc[num_reqs]), which no attention program writes."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    dm = d < HEAD
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + h * stride_ch + d
        key = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=dm)
        val = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=dm)
        if FP8_MAX > 0:
            key = tl.clamp(key.to(tl.float32) * k_inv_scale, -FP8_MAX, FP8_MAX)
            val = tl.clamp(val.to(tl.float32) * v_inv_scale, -FP8_MAX, FP8_MAX)
            if FP8_MANT_DROP > 0:
                key = _round_to_fp8_grid(key, FP8_MANT_DROP, FP8_MIN_NORMAL, FP8_MAGIC)
                val = _round_to_fp8_grid(val, FP8_MANT_DROP, FP8_MIN_NORMAL, FP8_MAGIC)
        tl.store(k_cache_ptr + dst, key.to(k_cache_ptr.dtype.element_ty), mask=dm)
        tl.store(v_cache_ptr + dst, val.to(v_cache_ptr.dtype.element_ty), mask=dm)
    if ZERO_PADDED:
        if t >= tl.load(qsl_ptr + num_reqs):
            o = tl.arange(0, BLOCK_O)
            zeros = tl.zeros([BLOCK_O], dtype=out_ptr.dtype.element_ty)
            tl.store(out_ptr + t * stride_ot + h * OUT_COLS + o, zeros, mask=o < OUT_COLS)


def _interpreter_rounding(dtype: torch.dtype) -> dict:
    """The `_round_to_fp8_grid` constants for an fp8 `dtype` under the CPU interpreter (FP8_MANT_DROP 0: off)."""
    if not is_fp8(dtype) or os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
        return dict(FP8_MANT_DROP=0, FP8_MIN_NORMAL=0.0, FP8_MAGIC=0.0)
    mantissa = FP8_MANTISSA_BITS[dtype]
    min_normal = float(torch.finfo(dtype).tiny)
    return dict(FP8_MANT_DROP=23 - mantissa, FP8_MIN_NORMAL=min_normal,
                FP8_MAGIC=1.5 * min_normal * 2.0 ** (23 - mantissa))


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, out: torch.Tensor | None = None,
                      query_start_loc: torch.Tensor | None = None, num_reqs: int = 0, k_scale: float = 1.0,
                      v_scale: float = 1.0) -> None:
    """Write key/value (num_tokens, kv_heads, head) into the caches at slot_mapping; slots < 0 are skipped.
    fp8 caches store `key / k_scale` and `value / v_scale`, saturated (`weavelm.ops.kv_quant`).

    With `out` (num_tokens, num_heads, head) and `query_start_loc`, rows of `out` at or after
    query_start_loc[num_reqs] (CUDA-graph padding) are zeroed in the same launch.
    """
    num_tokens = min(key.shape[0], slot_mapping.shape[0])
    if num_tokens == 0:
        return
    kv_heads, head = key.shape[1], key.shape[2]
    assert key.stride(2) == 1 and value.stride(2) == 1 and k_cache.stride() == v_cache.stride()
    assert k_cache.stride(3) == 1
    zero = out is not None and query_start_loc is not None
    out_cols = out.shape[1] // kv_heads * head if zero else 1
    _reshape_and_cache_kernel[(num_tokens, kv_heads)](
        key, value, k_cache, v_cache, slot_mapping, out if zero else key,
        query_start_loc if zero else slot_mapping, num_reqs, 1.0 / k_scale, 1.0 / v_scale,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0) if zero else 0,
        BLOCK_SIZE=k_cache.shape[1], HEAD=head, BLOCK_D=triton.next_power_of_2(head),
        OUT_COLS=out_cols, BLOCK_O=triton.next_power_of_2(out_cols), ZERO_PADDED=zero,
        FP8_MAX=fp8_max(k_cache.dtype) if is_fp8(k_cache.dtype) else 0.0,
        **_interpreter_rounding(k_cache.dtype), num_warps=1,
    )
