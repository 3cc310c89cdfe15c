"""Activations of gated MLPs: `SiluAndMul` (Llama family) and `GeluAndMul` (Gemma's gelu / gelu_pytorch_tanh)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weavelm.layers import kernels
from weavelm.ops import native


class SiluAndMul(nn.Module):
    """(..., 2d) -> silu(x[..., :d]) * x[..., d:]: the gate is the first half (the `[gate | up]` layout of
    `MergedColumnParallelLinear` and of fused `gate_up_proj` checkpoints)."""

    def __init__(self):
        super().__init__()
        self.use_triton = kernels.triton_ops_enabled()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_triton and kernels.triton_device(x):
            return kernels.ops().silu_and_mul(x)
        if x.is_cpu and native.usable(x) and x.is_contiguous():
            return native.silu_mul(x)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


class GeluAndMul(nn.Module):
    """(..., 2d) -> gelu(x[..., :d]) * x[..., d:], same `[gate | up]` layout as `SiluAndMul`. `approximate="tanh"`
    is transformers' `gelu_pytorch_tanh` (Gemma 2 / 3); "none" is the exact erf gelu."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GeluAndMul: approximate must be 'none' or 'tanh' (got {approximate!r})")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.gelu(x[..., :d], approximate=self.approximate) * x[..., d:]
