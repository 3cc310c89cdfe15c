"""Temperature sampling in one pass over the logits (Triton): the Gumbel-max trick.

argmax_i(logit_i / T + G_i), with G_i = -log(-log U_i) i.i.d. Gumbel, draws i with probability softmax(logit / T)_i
(the exponential race `argmax p_i / E_i` that the torch path uses, in log space). One program per row reads the row
once in its own dtype (bf16 logits need no fp32 copy), draws its noise from Philox in registers and keeps a running
argmax, so sampling costs one read of the logits, like greedy. Rows with temperature 0 take the plain argmax (ties
to the lowest index, as `torch.argmax`). The noise of row r, token i in a call with seed s is Philox(s, r * V + i):
a fixed function of the seed the caller draws per step.

Used by `sampler.sample` on CUDA for batches without top-k / top-p / min-p and without per-request seeds (those keep
the torch path, whose seeded draws come from each request's own generator).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["seed"])  # a fresh seed every step must not compile a new variant
def _gumbel_argmax_kernel(logits_ptr, stride_row, inv_temp_ptr, out_ptr, seed, V, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    inv_t = tl.load(inv_temp_ptr + row)
    base = logits_ptr + row.to(tl.int64) * stride_row
    best_val = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK], 0, tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if inv_t > 0:
            u = tl.rand(seed, row * V + cols)
            x = x * inv_t - tl.log(-tl.log(u))
        x = tl.where(mask, x, float("-inf"))
        better = x > best_val  # strict: an earlier column keeps a tie
        best_val = tl.where(better, x, best_val)
        best_idx = tl.where(better, cols, best_idx)
    top = tl.max(best_val, axis=0)
    # lowest column among the lanes holding the maximum
    cand = tl.where(best_val == top, best_idx, V)
    tl.store(out_ptr + row, tl.min(cand, axis=0).to(tl.int64))


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor, seed: int) -> torch.Tensor:
    """logits: (n, V) any float dtype, last dim contiguous; temperature: (n,) float32 (0: greedy row).
    Returns (n,) int64 sampled ids."""
    n, vocab = logits.shape
    out = torch.empty(n, dtype=torch.int64, device=logits.device)
    if n == 0:
        return out
    inv_temp = torch.where(temperature > 0, 1.0 / temperature.clamp(min=1e-6), torch.zeros_like(temperature))
    block = min(2048, triton.next_power_of_2(vocab))
    _gumbel_argmax_kernel[(n,)](logits, logits.stride(0), inv_temp.float().contiguous(), out, seed, vocab,
                                BLOCK=block, num_warps=8 if block >= 1024 else 4)
    return out
