"""Triton kernels for the non-attention hot path: RMSNorm (+ fused residual add), SiLU-and-mul, neox rotary.

Imported by `weavelm.layers.kernels.ops()` only when a CUDA tensor reaches a layer, so listing plugins never imports
triton. Each op reproduces the rounding of the torch path of the layers (fp32 arithmetic, cast to the input dtype
where torch casts), so results agree with it to within one ulp of the dtype; the rotary op computes in fp32
throughout and casts once (torch rounds cos/sin and each product to the input dtype first). Launchers read only
shapes, strides and Python numbers: nothing syncs with the device, so they can be captured in a CUDA graph once
compiled.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, num_rows, inner, sx0, sx1, sr0, sr1, eps,
    N: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, HAS_RES: tl.constexpr,
):
    """ROWS rows of N per program. Row r of x sits at (r // inner) * sx0 + (r % inner) * sx1, which covers both a
    2-D (tokens, N) tensor (inner=1) and a per-head view (tokens, heads, N) cut out of a packed projection."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    mask = (rows < num_rows)[:, None] & cmask[None, :]
    x = tl.load(x_ptr + ((rows // inner) * sx0 + (rows % inner) * sx1)[:, None] + cols[None, :], mask=mask, other=0.0)
    dense = rows[:, None] * N + cols[None, :]
    if HAS_RES:
        r = tl.load(res_ptr + ((rows // inner) * sr0 + (rows % inner) * sr1)[:, None] + cols[None, :], mask=mask,
                    other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + dense, x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=1) / N + eps)
    y = (h * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + dense, (y * w[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, D, BLOCK: tl.constexpr):
    """Grid (tokens, cdiv(D, BLOCK)): out[t, j] = silu(x[t, j]) * x[t, D + j], silu rounded to the dtype first."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < D
    a = tl.load(x_ptr + t * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + t * stride_x + D + cols, mask=m, other=0.0).to(tl.float32)
    s = (a / (1.0 + tl.exp(-a))).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + t * D + cols, (s * b).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rotate_heads(src, dst, stride_h, cos, sin, d, dmask,
                  H: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    m = (h < H)[:, None] & dmask[None, :]
    off = h[:, None] * stride_h + d[None, :]
    x1 = tl.load(src + off, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + off + HALF, mask=m, other=0.0).to(tl.float32)
    dst_off = h[:, None] * (2 * HALF) + d[None, :]
    tl.store(dst + dst_off, (x1 * cos - x2 * sin).to(dst.dtype.element_ty), mask=m)
    tl.store(dst + dst_off + HALF, (x2 * cos + x1 * sin).to(dst.dtype.element_ty), mask=m)


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, sq0, sq1, sk0, sk1, stride_cache,
    HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Grid (tokens,): rotates every query and key head of one token with that token's cos/sin row."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < HALF
    cos = tl.load(cos_ptr + pos * stride_cache + d, mask=dmask, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * stride_cache + d, mask=dmask, other=0.0)[None, :]
    _rotate_heads(q_ptr + t * sq0, q_out_ptr + t * (HQ * 2 * HALF), sq1, cos, sin, d, dmask, HQ, HALF, BLOCK_HQ)
    _rotate_heads(k_ptr + t * sk0, k_out_ptr + t * (HK * 2 * HALF), sk1, cos, sin, d, dmask, HK, HALF, BLOCK_HK)


def _rows_view(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int]:
    """(x, num_rows, inner, stride0, stride1) addressing x's rows of x.shape[-1] with two strides."""
    if x.stride(-1) != 1 or x.dim() > 3:
        x = x.contiguous()
    if x.dim() == 3:
        return x, x.shape[0] * x.shape[1], x.shape[1], x.stride(0), x.stride(1)
    if x.dim() == 2:
        return x, x.shape[0], 1, x.stride(0), 0
    return x, 1, 1, 0, 0


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    n = x.shape[-1]
    assert weight.shape == (n,), (tuple(weight.shape), n)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    xv, rows, inner, sx0, sx1 = _rows_view(x)
    rv, sr0, sr1 = xv, 0, 0
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype
        rv, _, _, sr0, sr1 = _rows_view(residual)
    if rows == 0 or out.numel() == 0:
        return out, res_out
    block_n = triton.next_power_of_2(n)
    per_prog = max(1, min(16, 2048 // block_n))
    num_warps = min(8, max(1, per_prog * block_n // 512))
    _rms_norm_kernel[(triton.cdiv(rows, per_prog),)](
        xv, rv, weight, out, res_out if res_out is not None else out, rows, inner, sx0, sx1, sr0, sr1, eps,
        N=n, BLOCK_N=block_n, ROWS=per_prog, HAS_RES=residual is not None, num_warps=num_warps)
    return out, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x (..., N), any strides; returns a contiguous tensor of x's shape."""
    return _norm(x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), the sum rounded to x's dtype before the norm, as torch does."""
    return _norm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x (..., 2d) -> silu(x[..., :d]) * x[..., d:], contiguous (..., d)."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block = min(1024, triton.next_power_of_2(d))
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](x2, out, x2.stride(0), d, BLOCK=block,
                                                               num_warps=4 if block >= 512 else 1)
    return out


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox rotary embedding. positions: (tokens,) int; q: (tokens, heads, head_dim), k: (tokens, kv_heads,
    head_dim), any strides; cos_cache/sin_cache: (max_positions, head_dim // 2) float32. Returns contiguous
    rotated copies of q and k."""
    tokens, hq, head_dim = q.shape
    hk, half = k.shape[1], head_dim // 2
    assert k.shape == (tokens, hk, head_dim) and cos_cache.shape[1] == half == sin_cache.shape[1]
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cos_cache, sin_cache = cos_cache.contiguous(), sin_cache.contiguous()
    q_out = torch.empty((tokens, hq, head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((tokens, hk, head_dim), dtype=k.dtype, device=k.device)
    if tokens == 0:
        return q_out, k_out
    block_half = triton.next_power_of_2(half)
    num_warps = 4 if triton.next_power_of_2(hq) * block_half >= 1024 else 2
    _rotary_kernel[(tokens,)](
        positions.contiguous(), q, k, cos_cache, sin_cache, q_out, k_out, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), cos_cache.stride(0), HQ=hq, HK=hk, HALF=half, BLOCK_HQ=triton.next_power_of_2(hq),
        BLOCK_HK=triton.next_power_of_2(hk), BLOCK_HALF=block_half, num_warps=num_warps)
    return q_out, k_out
