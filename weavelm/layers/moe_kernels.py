"""The grouped-GEMM Triton kernel of `FusedMoE` (vLLM's `fused_moe` shape), used for CUDA tensors.

1. `moe_align_block_size`: the (token, expert) pairs (`T * top_k`, flat index `t * top_k + j`) sorted by expert,
   each expert's run padded to a multiple of BLOCK_M with the sentinel `T * top_k`, and the expert of every
   BLOCK_M block. Pure torch, no host sync (the padded length is bounded by `T * top_k + E * (BLOCK_M - 1)`; blocks
   past the real end exit at once), so it can be captured in a CUDA graph.
2. `_grouped_gemm_kernel` for w13: one launch over all experts; block `m` multiplies its pairs' token rows by its
   expert's `[2I, H]` weight, into a (T * top_k, 2I) buffer.
3. SiLU-and-mul (`triton_ops.silu_and_mul`) -> (T * top_k, I).
4. `_grouped_gemm_kernel` for w2, the routing weight multiplied into the fp32 accumulator -> (T * top_k, H).
5. The top_k rows of each token summed.

Accumulation is fp32; fp32 inputs use IEEE fp32 dot products (no TF32), so the result matches `moe_reference` to
float rounding. Tested against it on the CPU under TRITON_INTERPRET=1 (tests/test_moe.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, w_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
    N, K, num_valid, num_experts, stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    TOP_K: tl.constexpr, MUL_WEIGHT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (padded pairs / BLOCK_M, cdiv(N, BLOCK_N)). C[pair, n] = sum_k A[pair // TOP_K, k] * B[e, n, k]
    (times the pair's routing weight when MUL_WEIGHT), for the BLOCK_M sorted pairs of this block, all of expert
    e = expert_ids[block]; sentinel pairs (>= num_valid) are neither read nor written, nor are blocks of the
    marker expert `num_experts` (pairs another expert-parallel rank holds)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)
    pmask = pair < num_valid
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if expert >= num_experts:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (pair // TOP_K)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        kmask = offs_k < K - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=pmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if UPCAST:  # triton's interpreter multiplies bf16 blocks wrongly; it gets them as fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if MUL_WEIGHT:
        w = tl.load(w_ptr + pair, mask=pmask, other=0.0)
        acc = acc * w[:, None]
    c_ptrs = c_ptr + pair[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=pmask[:, None] & nmask[None, :])


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_ids (P,) int32: pair indices grouped by expert, each group padded to a multiple of `block_m` with
    `T * top_k`; expert_ids (P / block_m,) int32: each block's expert; num_padded (1,) int32: the used length of
    sorted_ids). P = the bound `T * top_k + E * (block_m - 1)` rounded up to `block_m`, so nothing syncs. Ids may
    include a marker expert as the last of the `num_experts` groups (the caller counts it)."""
    flat = topk_ids.reshape(-1)
    n, dev = flat.numel(), flat.device
    bound = triton.cdiv(n + num_experts * (block_m - 1), block_m) * block_m
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    sorted_expert = flat[order]
    first = torch.cumsum(counts, 0) - counts  # where each expert's pairs begin in `order`
    dest = (ends - padded)[sorted_expert] + torch.arange(n, device=dev) - first[sorted_expert]
    sorted_ids = torch.full((bound,), n, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, bound, block_m, device=dev)
    expert_ids = torch.searchsorted(ends, block_starts, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_ids, expert_ids, ends[-1:].to(torch.int32)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _launch(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, weights: torch.Tensor | None, sorted_ids, expert_ids,
            num_padded, top_k: int, block_m: int, num_experts: int) -> None:
    n_out, k_in = b.shape[1], b.shape[2]
    block_n = 64 if n_out >= 64 else 32
    block_k = 64 if k_in >= 64 else 32
    grid = (sorted_ids.numel() // block_m, triton.cdiv(n_out, block_n))
    _grouped_gemm_kernel[grid](
        a, b, c, weights if weights is not None else c, sorted_ids, expert_ids, num_padded,
        n_out, k_in, c.shape[0], num_experts, a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
        c.stride(0), c.stride(1),
        TOP_K=top_k, MUL_WEIGHT=weights is not None,
        IEEE=a.dtype == torch.float32, UPCAST=a.dtype == torch.bfloat16 and _interpreted(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, block_m: int | None = None, skip_marked: bool = False) -> torch.Tensor:
    """The routed experts' output (T, H) of x (T, H) with w13 (E, 2I, H), w2 (E, H, I) and the routing (T, k):
    `moe_reference`'s result, in two grouped-GEMM launches. `skip_marked`: ids may be `E` (a pair another
    expert-parallel rank holds), which contributes nothing."""
    from weavelm.layers import triton_ops

    t, k = topk_ids.shape
    num_experts = w13.shape[0]
    if block_m is None:
        block_m = 16 if t * k <= 4 * num_experts else 64
    x = x.contiguous()
    groups = num_experts + 1 if skip_marked else num_experts
    sorted_ids, expert_ids, num_padded = moe_align_block_size(topk_ids, block_m, groups)
    gate_up = torch.empty((t * k, w13.shape[1]), dtype=x.dtype, device=x.device)
    _launch(x, w13, gate_up, None, sorted_ids, expert_ids, num_padded, k, block_m, num_experts)
    inter = triton_ops.silu_and_mul(gate_up)
    alloc = torch.zeros if skip_marked else torch.empty  # marked pairs' rows stay zero
    out = alloc((t * k, w2.shape[1]), dtype=x.dtype, device=x.device)
    _launch(inter, w2, out, topk_weights.reshape(-1).to(torch.float32).contiguous(), sorted_ids, expert_ids,
            num_padded, 1, block_m, num_experts)
    return out.view(t, k, w2.shape[1]).sum(dim=1)
