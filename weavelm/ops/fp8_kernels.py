"""fp8 (float8_e4m3fn) weights: quantizing, dequantizing and multiplying, shared by the fp8 quantization schemes.

One in-memory layout covers every fp8 checkpoint kind: an fp8 weight `w` of shape (N, K) and a float32 scale `s`
of shape (cdiv(N, gn), cdiv(K, gk)) with `W[n, k] = w[n, k] * s[n // gn, k // gk]`; `group = (gn, gk)`.
- block checkpoints (`weight_block_size: [128, 128]`, DeepSeek-V3 / Qwen3-FP8): group (128, 128), edge blocks
  partial; (1, 128) when the shard boundaries of a fused layer do not fall on block rows (each row then carries
  its block's scale, which is exact);
- per-tensor and per-channel checkpoints, and on-the-fly quantization (per output channel): group (1, K).

Matmuls (`x @ W^T`):
- `dequantize` + `F.linear` in the activation dtype (weight-only: the CPU and GPUs without fp8);
- W8A8 on CUDA sm89+: activations quantized per token (`quantize_per_token`) for `torch._scaled_mm` with row-wise
  scales (group (1, K)), or per token and 128-wide group (`quantize_per_token_group`) for the Triton block-scaled
  GEMM (`weavelm.ops.fp8_triton`), whose torch reference is `block_scaled_mm_reference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from weavelm.utils import cdiv

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
MIN_SCALE = 1e-12  # keeps all-zero rows / blocks finite


def expand_scale(scale: torch.Tensor, shape: tuple[int, int], group: tuple[int, int]) -> torch.Tensor:
    """The (N, K) float32 scale of every element of a weight of `shape` (see the module docstring)."""
    n, k = shape
    s = scale.float()
    if group[0] > 1:
        s = s.repeat_interleave(group[0], 0)
    if group[1] > 1:
        s = s.repeat_interleave(group[1], 1)
    return s[:n, :k]


def dequantize(weight: torch.Tensor, scale: torch.Tensor, group: tuple[int, int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`weight.float() * scale` per group, in float32, cast to `dtype` (exact in float32)."""
    w = weight.float() * expand_scale(scale, tuple(weight.shape), group)
    return w if dtype == torch.float32 else w.to(dtype)


def quantize(w: torch.Tensor, group: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`(fp8 weight, float32 scale)` of a float (N, K) weight with one scale per `group` block
    (scale = max |w| / 448 over the block, edge blocks partial): the packing of block-fp8 checkpoints, and with
    group (1, K) the per-channel on-the-fly quantization."""
    n, k = w.shape
    gn, gk = group
    rows, cols = cdiv(n, gn), cdiv(k, gk)
    padded = torch.zeros(rows * gn, cols * gk, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    blocks = padded.view(rows, gn, cols, gk)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=MIN_SCALE)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(rows * gn, cols * gk)[:n, :k]
    return q.to(FP8_DTYPE).contiguous(), scale


def quantize_per_token(x: torch.Tensor, input_scale: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(fp8 x, (M, 1) float32 scale)`: dynamic per-token scales, or the checkpoint's static per-tensor
    `input_scale` repeated per token."""
    if input_scale is None:
        scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=MIN_SCALE)
    else:
        scale = input_scale.float().reshape(1, 1).expand(x.shape[0], 1)
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.contiguous()


def quantize_per_token_group(x: torch.Tensor, group_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(fp8 x, (M, cdiv(K, group_k)) float32 scale)`: dynamic scales per token and `group_k`-wide group of input
    features (the activation side of block-fp8 W8A8)."""
    q, scale = quantize(x, (1, group_k))
    return q, scale


def block_scaled_mm_reference(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                              b_group: tuple[int, int], out_dtype: torch.dtype) -> torch.Tensor:
    """The float32 reference of the block-scaled GEMM: `dequant(a) @ dequant(b)^T` with a (M, K) fp8 in groups
    (1, b_group[1]) and b (N, K) fp8 in `b_group`."""
    a_deq = dequantize(a, a_scale, (1, b_group[1]))
    return (a_deq @ dequantize(b, b_scale, b_group).t()).to(out_dtype)


def fp8_supported(device: torch.device) -> bool:
    """Whether `device` multiplies fp8 natively (CUDA compute capability 8.9 or newer: Ada, Hopper, Blackwell)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def scaled_mm_rowwise(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                      input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 `x @ W^T + bias` through `torch._scaled_mm` with per-token activation scales and one scale per weight row
    (`scale`: (N, 1)); row-wise scaling computes in bfloat16 output, cast to x's dtype."""
    q, x_scale = quantize_per_token(x.reshape(-1, x.shape[-1]), input_scale)
    out = torch._scaled_mm(q, weight.t(), scale_a=x_scale, scale_b=scale.reshape(1, -1).float(),
                           out_dtype=torch.bfloat16)
    out = out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


def can_scaled_mm(weight: torch.Tensor) -> bool:
    """`torch._scaled_mm`'s shape rule: both weight dimensions multiples of 16."""
    n, k = weight.shape
    return n % 16 == 0 and k % 16 == 0


def weight_only_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group: tuple[int, int],
                       bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ W^T + bias` with W dequantized into x's dtype for this call (nothing cached; the fp8 weight stays the
    only resident copy)."""
    return F.linear(x, dequantize(weight, scale, group, x.dtype), bias)
