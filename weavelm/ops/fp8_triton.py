"""The Triton block-scaled fp8 GEMM (W8A8 for block-fp8 checkpoints): `out = dequant(a) @ dequant(b)^T`.

a: (M, K) float8_e4m3fn activations with a float32 scale per token and `group_k`-wide group, (M, cdiv(K, group_k));
b: (N, K) float8_e4m3fn weight with a float32 scale per (`group_n` rows, `group_k` columns) block,
(cdiv(N, group_n), cdiv(K, group_k)); `group_n` may be 1 (a scale per row, see `weavelm.ops.fp8_kernels`).
Each program computes a BLOCK_M x BLOCK_N tile, walking K one scale group at a time (BLOCK_K = group_k): the fp8
tile product is accumulated in float32 and scaled by the token's and the weight block's scales. Edges (M, N, K not
multiples of the tile) are masked. Imported only when a CUDA tensor reaches the fp8 method (or by the interpreter
tests, `TRITON_INTERPRET=1`), so listing plugins never imports triton. `block_scaled_mm_reference` in
`fp8_kernels.py` is its reference (tests/test_quant_fp8.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from weavelm.utils import cdiv


@triton.jit
def _block_fp8_mm_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_as_m, stride_as_k, stride_bs_n, stride_bs_k,
    GROUP_N: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
    b_cols = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn
    as_rows = as_ptr + offs_m * stride_as_m
    bs_cols = bs_ptr + (offs_n // GROUP_N) * stride_bs_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k = kb * BLOCK_K + offs_k
        mask_k = k < K
        a = tl.load(a_rows + k[None, :] * stride_ak, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_cols + k[:, None] * stride_bk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        a_s = tl.load(as_rows + kb * stride_as_k, mask=mask_m, other=0.0)
        b_s = tl.load(bs_cols + kb * stride_bs_k, mask=mask_n, other=0.0)
        acc += tl.dot(a, b, out_dtype=tl.float32) * a_s[:, None] * b_s[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def block_scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                    b_group: tuple[int, int], out_dtype: torch.dtype,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """(M, N) `out_dtype` = dequant(a) @ dequant(b)^T (+ bias); shapes as in the module docstring."""
    m, k = a.shape
    n = b.shape[0]
    group_n, group_k = b_group
    assert b.shape[1] == k and a_scale.shape == (m, cdiv(k, group_k)), (a.shape, a_scale.shape, b.shape)
    assert b_scale.shape == (cdiv(n, group_n), cdiv(k, group_k)), (b_scale.shape, b.shape, b_group)
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    # vLLM's default tile for this GEMM is 64 x 128 x 128 (4 warps); decode-sized M takes 16-row tiles and narrower
    # columns while there are fewer than ~2 tiles per SM of a 132-SM card (untuned guesses, to be measured)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 128 if m > 16 else 64 if cdiv(n, 64) >= 264 else 32
    grid = (cdiv(m, block_m), cdiv(n, block_n))
    _block_fp8_mm_kernel[grid](
        a, b, out, a_scale, b_scale, bias if bias is not None else out, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1),
        GROUP_N=group_n, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=group_k,
        num_warps=4, num_stages=3 if a.is_cuda else 1,
    )
    return out
