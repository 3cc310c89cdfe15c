"""Triton kernels of batched LoRA (Punica's SGMV, grouped by adapter slot); see ops.py for the definition.

`lora_shrink(x, A, index) -> (T, R) fp32` and `lora_expand(h, B, y, index)` (adds into y in place). `index` is
(sorted token positions, tokens per slot, start of each slot's run) from `ops.group_by_slot`. The grid is fixed by
shapes alone, (token tiles, output tiles, slots), and a program whose slot has no tokens in its tile returns at
once, so launches never read device values on the host and are safe to capture in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, out_ptr, order_ptr, counts_ptr, starts_ptr, K, R, K_PER_SPLIT,
                   sxm, sxk, sal, sar, sak, som, sor,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Grid (token tiles, rank tiles, slots * SPLIT_K). With SPLIT_K > 1 each program sums one K range and adds
    it atomically into the zeroed output: more programs for the few tokens of a decode step."""
    pid_m, pid_n, pid_z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot, split = pid_z // SPLIT_K, pid_z % SPLIT_K
    count = tl.load(counts_ptr + slot)
    if pid_m * BM >= count:
        return
    start = tl.load(starts_ptr + slot)
    offs = pid_m * BM + tl.arange(0, BM)
    mmask = offs < count
    rows = tl.load(order_ptr + start + offs, mask=mmask, other=0).to(tl.int64)
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < R
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_lo = split * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    for k0 in range(k_lo, k_hi, BK):
        rk = k0 + tl.arange(0, BK)
        kmask = rk < k_hi
        xt = tl.load(x_ptr + rows[:, None] * sxm + rk[None, :] * sxk, mask=mmask[:, None] & kmask[None, :],
                     other=0.0)
        at = tl.load(a_ptr + slot * sal + rn[None, :] * sar + rk[:, None] * sak, mask=kmask[:, None] & nmask[None, :],
                     other=0.0)
        acc += tl.dot(xt, at.to(xt.dtype), input_precision=PRECISION)
    optr = out_ptr + rows[:, None] * som + rn[None, :] * sor
    if SPLIT_K == 1:
        tl.store(optr, acc, mask=mmask[:, None] & nmask[None, :])
    else:
        tl.atomic_add(optr, acc, mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _expand_kernel(h_ptr, b_ptr, y_ptr, order_ptr, counts_ptr, starts_ptr, N, R,
                   shm, shr, sbl, sbn, sbr, sym, syn,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_n, slot = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    count = tl.load(counts_ptr + slot)
    if pid_m * BM >= count:
        return
    start = tl.load(starts_ptr + slot)
    offs = pid_m * BM + tl.arange(0, BM)
    mmask = offs < count
    rows = tl.load(order_ptr + start + offs, mask=mmask, other=0).to(tl.int64)
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, R, BK):
        rk = r0 + tl.arange(0, BK)
        kmask = rk < R
        h = tl.load(h_ptr + rows[:, None] * shm + rk[None, :] * shr, mask=mmask[:, None] & kmask[None, :], other=0.0)
        bt = tl.load(b_ptr + slot * sbl + rn[None, :] * sbn + rk[:, None] * sbr, mask=kmask[:, None] & nmask[None, :],
                     other=0.0)
        acc += tl.dot(h.to(bt.dtype), bt, input_precision=PRECISION)
    mask = mmask[:, None] & nmask[None, :]
    yp = y_ptr + rows[:, None] * sym + rn[None, :] * syn
    y = tl.load(yp, mask=mask, other=0.0)
    tl.store(yp, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


MAX_SPLIT_K, SPLIT_K_CHUNK = 8, 256


def _tile(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                ) -> torch.Tensor:
    """(T, R) fp32: row t = x[t] @ A[slot(t)]^T for tokens with a slot; other rows are left unset."""
    order, counts, starts = index
    t, k = x.shape
    num_slots, r, _ = lora_a.shape
    bm, bn, bk = (16 if t <= 64 else 64), _tile(r, 16, 64), _tile(k, 16, 64)
    # decode-sized batches: split K so more than a handful of programs share the reads of A
    split_k = min(MAX_SPLIT_K, triton.cdiv(k, SPLIT_K_CHUNK)) if t <= 64 else 1
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), bk) * bk
    split_k = triton.cdiv(k, k_per_split)
    out = (torch.zeros if split_k > 1 else torch.empty)((t, r), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(t, bm), triton.cdiv(r, bn), num_slots * split_k)
    _shrink_kernel[grid](x, lora_a, out, order, counts, starts, k, r, k_per_split, x.stride(0), x.stride(1),
                         lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), out.stride(0), out.stride(1),
                         BM=bm, BN=bn, BK=bk, SPLIT_K=split_k, PRECISION=_precision(x.dtype))
    return out


def lora_expand(h: torch.Tensor, lora_b: torch.Tensor, y: torch.Tensor,
                index: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """y[t] += h[t] @ B[slot(t)]^T in place for tokens with a slot; returns y."""
    order, counts, starts = index
    t, r = h.shape
    num_slots, n, _ = lora_b.shape
    bm, bn, bk = (16 if t <= 64 else 64), 64, _tile(r, 16, 64)
    grid = (triton.cdiv(t, bm), triton.cdiv(n, bn), num_slots)
    _expand_kernel[grid](h, lora_b, y, order, counts, starts, n, r, h.stride(0), h.stride(1),
                         lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), y.stride(0), y.stride(1),
                         BM=bm, BN=bn, BK=bk, PRECISION=_precision(lora_b.dtype))
    return y
