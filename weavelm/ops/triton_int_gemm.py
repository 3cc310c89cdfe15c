"""Triton weight-only integer GEMMs for CUDA: `x @ W^T` with W kept int4 (GPTQ layout) or int8 (per output channel).

`int4_dequantize` writes the whole int4 weight in the activation dtype in one pass, for wide inputs (prefill), which
cuBLAS then multiplies.

Imported only when a CUDA tensor reaches an int4 / int8 layer (or under TRITON_INTERPRET=1 in tests), so listing
plugins never imports triton. Both kernels dequantize each (BLOCK_K, BLOCK_N) weight tile in registers into the
activation dtype (fp16 / bf16; fp32 in the interpreter), multiply it with `tl.dot`, and accumulate in fp32; nothing
dense is materialised in memory. When the (M, N) tiles alone would leave most SMs idle (decode), K is split over
`split_k` programs that add their fp32 partial sums atomically (so the last bits may differ between runs).

Layouts (`weavelm.ops.int4_kernels.Int4Weight`, `weavelm.ops.quant_kernels.Int8Pack`):
- int4: qweight (K / 8, N) int32, feature k = 8 r + j in bits [4 j, 4 j + 4) of row r; scales, zeros (G, N) with
  w[n, k] = (q - zeros[k // group_size, n]) * scales[k // group_size, n];
- int8: q (N, K) int8, scale (N,): w[n, k] = q[n, k] * scale[n] (the scale is applied to the fp32 sum).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _int4_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, K, group_size, k_per_split,
                      sxm, sxk, sqk, sqn, ssg, ssn, som, son,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr,
                      TILE_IN_GROUP: tl.constexpr):
    """TILE_IN_GROUP: every K tile lies inside one group (BLOCK_K divides group_size), so a tile reads one row of
    scales and zeros instead of one per feature."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    nmask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + rk
        kmask = k < k_end
        x = tl.load(x_ptr + rm[:, None] * sxm + k[None, :] * sxk, mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & nmask[None, :]
        packed = tl.load(qw_ptr + (k // 8)[:, None] * sqk + rn[None, :] * sqn, mask=wmask, other=0)
        q = ((packed >> ((k % 8) * 4)[:, None]) & 0xF).to(tl.float32)
        if TILE_IN_GROUP:
            g = k0 // group_size
            s = tl.load(s_ptr + g * ssg + rn * ssn, mask=nmask, other=0.0).to(tl.float32)[None, :]
            z = tl.load(z_ptr + g * ssg + rn * ssn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        else:
            g = k // group_size
            s = tl.load(s_ptr + g[:, None] * ssg + rn[None, :] * ssn, mask=wmask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g[:, None] * ssg + rn[None, :] * ssn, mask=wmask, other=0.0).to(tl.float32)
        w = ((q - z) * s).to(x_ptr.dtype.element_ty)
        acc += tl.dot(x, w)
    omask = (rm[:, None] < M) & nmask[None, :]
    optr = out_ptr + rm[:, None] * som + rn[None, :] * son
    if ATOMIC:
        tl.atomic_add(optr, acc, mask=omask)
    else:
        tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _int4_dequant_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, group_size, sqk, sqn, ssg, ssn, sok, son,
                         BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[k, n] = (q[k, n] - zeros[g, n]) * scales[g, n] in out's dtype, one (BLOCK_K, BLOCK_N) tile per program."""
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (k < K)[:, None] & (n < N)[None, :]
    packed = tl.load(qw_ptr + (k // 8)[:, None] * sqk + n[None, :] * sqn, mask=mask, other=0)
    q = ((packed >> ((k % 8) * 4)[:, None]) & 0xF).to(tl.float32)
    g = k // group_size
    s = tl.load(s_ptr + g[:, None] * ssg + n[None, :] * ssn, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g[:, None] * ssg + n[None, :] * ssn, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + k[:, None] * sok + n[None, :] * son, ((q - z) * s).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _int8_gemm_kernel(x_ptr, q_ptr, s_ptr, out_ptr, M, N, K, k_per_split,
                      sxm, sxk, sqn, sqk, som, son,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    nmask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + rk
        kmask = k < k_end
        x = tl.load(x_ptr + rm[:, None] * sxm + k[None, :] * sxk, mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        q = tl.load(q_ptr + rn[None, :] * sqn + k[:, None] * sqk, mask=kmask[:, None] & nmask[None, :], other=0)
        acc += tl.dot(x, q.to(x_ptr.dtype.element_ty))
    acc = acc * tl.load(s_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    omask = (rm[:, None] < M) & nmask[None, :]
    optr = out_ptr + rm[:, None] * som + rn[None, :] * son
    if ATOMIC:
        tl.atomic_add(optr, acc, mask=omask)
    else:
        tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=omask)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _tiles(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) by row count: thin tiles for decode, square ones for prefill."""
    if m <= 16:
        return 16, 64, 128, 4
    if m <= 64:
        return 32, 64, 64, 4
    return 64, 128, 64, 8


def _split(x: torch.Tensor, m: int, n: int, k: int, bm: int, bn: int, bk: int, split_k: int | None) -> int:
    if split_k is not None:
        return max(1, split_k)
    if not x.is_cuda:
        return 1
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    sms = _num_sms(x.device.index or 0)
    return max(1, min(triton.cdiv(k, bk) // 2, 2 * sms // tiles, 16)) if tiles < sms else 1


def _launch(kernel, x: torch.Tensor, n: int, k: int, split_k: int | None, tensors: tuple, scalars: tuple,
            strides: tuple, group_size: int | None = None, **constexprs):
    m = x.shape[0]
    bm, bn, bk, warps = _tiles(m)
    if group_size is not None:  # int4: a K tile inside one group when a power of two >= 16 divides the group
        while bk > 16 and group_size % bk:
            bk //= 2
        constexprs["TILE_IN_GROUP"] = group_size % bk == 0
    split = _split(x, m, n, k, bm, bn, bk, split_k)
    k_per_split = triton.cdiv(triton.cdiv(k, bk), split) * bk
    split = triton.cdiv(k, k_per_split)
    out = torch.zeros((m, n), device=x.device, dtype=torch.float32) if split > 1 else \
        torch.empty((m, n), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), split)
    kernel[grid](x, *tensors, out, m, n, k, *scalars, k_per_split, x.stride(0), x.stride(1), *strides,
                 out.stride(0), out.stride(1), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, ATOMIC=split > 1,
                 num_warps=warps, **constexprs)
    return out.to(x.dtype) if split > 1 else out


def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
              split_k: int | None = None) -> torch.Tensor:
    """x (M, K) @ W^T -> (M, N) in x's dtype, W int4 in the layout above (scales/zeros in any float dtype)."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    assert x.shape[1] == k and scales.shape == zeros.shape and scales.stride() == zeros.stride()
    return _launch(_int4_gemm_kernel, x, n, k, split_k, (qweight, scales, zeros), (group_size,),
                   (qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1)), group_size=group_size)


def int8_gemm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, split_k: int | None = None) -> torch.Tensor:
    """x (M, K) @ (q * scale[:, None])^T -> (M, N) in x's dtype; q (N, K) int8, scale (N,)."""
    n, k = q.shape
    assert x.shape[1] == k and scale.shape == (n,)
    return _launch(_int8_gemm_kernel, x, n, k, split_k, (q, scale), (), (q.stride(0), q.stride(1)))


def int4_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """W^T, (K, N) in `dtype`, from the int4 layout above: one pass that reads the packed codes once and writes
    2 bytes per weight (the prefill path: cuBLAS then multiplies `x @ W^T`)."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    out = torch.empty((k, n), device=qweight.device, dtype=dtype)
    grid = (triton.cdiv(k, 64), triton.cdiv(n, 128))
    _int4_dequant_kernel[grid](qweight, scales, zeros, out, n, k, group_size, qweight.stride(0), qweight.stride(1),
                               scales.stride(0), scales.stride(1), out.stride(0), out.stride(1),
                               BLOCK_K=64, BLOCK_N=128, num_warps=4)
    return out
