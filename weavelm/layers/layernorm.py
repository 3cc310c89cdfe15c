"""RMSNorm (and Gemma's `(1 + weight)` variant), replicated on every tensor-parallel rank."""

from __future__ import annotations

import torch
from torch import nn

from weavelm.layers import kernels
from weavelm.layers.linear import default_weight_loader
from weavelm.ops import native


class RMSNorm(nn.Module):
    """RMSNorm computed as transformers does (fp32 statistics, weight applied in the input dtype).

    `forward(x, residual)` fuses the residual add: returns (norm(x + residual), x + residual). CUDA tensors run the
    Triton kernels, contiguous fp32 CPU tensors the native ones; the torch code is the reference."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.weight.weight_loader = default_weight_loader
        self.eps = eps
        self.use_triton = kernels.triton_ops_enabled()

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.use_triton and kernels.triton_device(x):
            if residual is None:
                return kernels.ops().rms_norm(x, self.weight, self.eps)
            return kernels.ops().fused_add_rms_norm(x, residual, self.weight, self.eps)
        if x.is_cpu and native.usable(x) and x.is_contiguous() and (residual is None or residual.is_contiguous()):
            return native.rmsnorm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def norm_heads_inplace(self, qkv: torch.Tensor, offset: int, num_heads: int, head_dim: int) -> None:
        """Normalise `num_heads` heads of `head_dim` starting at column `offset` of the (tokens, width) buffer `qkv`
        in place, with the native kernel (per-head Q/K norms; the caller checked `native.usable(qkv)`)."""
        native.head_norm_(qkv, offset, num_heads, head_dim, self.weight, self.eps)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: the checkpoint stores `weight` as an offset from one, and the whole norm runs in fp32
    (`x * rsqrt(mean(x^2) + eps) * (1 + weight)`, rounded once to the input dtype), as transformers'
    `Gemma3RMSNorm` does. `forward(x, residual)` fuses the residual add like `RMSNorm`: (norm(x + r), x + r).
    Applied to a (tokens, heads, head_dim) tensor it normalises each head (Gemma 3's Q/K norms)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.weight.weight_loader = default_weight_loader
        self.eps = eps

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
