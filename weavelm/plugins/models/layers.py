"""Building blocks shared by the architectures: RMSNorm, rotary embedding, SiLU-and-mul (replicated on every
tensor-parallel rank; the sharded layers are in parallel_layers.py).

On CUDA tensors RMSNorm, SiluAndMul and RotaryEmbedding run the Triton kernels of `triton_ops.py` (imported at the
first CUDA call); on fp32 CPU tensors, weavelm's native kernels (`weavelm.ops.native`, one call per layer op
instead of several torch ops) when they built. The torch code here is the fallback and the reference both are
tested against.
The config's `kernels: {triton_ops: false}`, read when a layer is built, keeps a layer on the torch path everywhere.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from weavelm.ops import native
from weavelm.ops import settings as kernel_settings


def triton_ops_enabled() -> bool:
    """Whether new layers may use the Triton kernels: triton is installed and the engine's `kernels.triton_ops` is
    on. Layers call this once, in their constructor."""
    if not kernel_settings.active().triton_ops:
        return False
    return importlib.util.find_spec("triton") is not None


def triton_device(x: torch.Tensor) -> bool:
    """The per-call check: the Triton kernels run on CUDA tensors only."""
    return x.is_cuda


def _ops():
    from weavelm.plugins.models import triton_ops
    return triton_ops


class RMSNorm(nn.Module):
    """RMSNorm computed as transformers does (fp32 statistics, weight applied in the input dtype).

    `forward(x, residual)` fuses the residual add: returns (norm(x + residual), x + residual)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.use_triton = triton_ops_enabled()

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.use_triton and triton_device(x):
            if residual is None:
                return _ops().rms_norm(x, self.weight, self.eps)
            return _ops().fused_add_rms_norm(x, residual, self.weight, self.eps)
        if x.is_cpu and native.usable(x) and x.is_contiguous() and (residual is None or residual.is_contiguous()):
            return native.rmsnorm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


class SiluAndMul(nn.Module):
    """(..., 2d) -> silu(x[..., :d]) * x[..., d:]."""

    def __init__(self):
        super().__init__()
        self.use_triton = triton_ops_enabled()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_triton and triton_device(x):
            return _ops().silu_and_mul(x)
        if x.is_cpu and native.usable(x) and x.is_contiguous():
            return native.silu_mul(x)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


def rope_inv_freq(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for the config's rope type, via transformers' own tables."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    if rope_type == "default":
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
        return inv, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    with torch.device("cpu"):
        inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate halves), cos/sin looked up per flattened position."""

    def __init__(self, hf_config, head_dim: int, max_positions: int):
        super().__init__()
        inv_freq, scaling = rope_inv_freq(hf_config, head_dim)  # on the CPU, in fp32, whatever the device
        freqs = torch.arange(max_positions, dtype=torch.float32, device="cpu")[:, None] * inv_freq[None, :]
        device = torch.empty(0).device  # the device the model is being built on
        self.register_buffer("cos_cache", (freqs.cos() * scaling).to(device), persistent=False)
        self.register_buffer("sin_cache", (freqs.sin() * scaling).to(device), persistent=False)
        self.head_dim = head_dim
        self.use_triton = triton_ops_enabled()

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: (tokens, heads, head_dim), k: (tokens, kv_heads, head_dim); positions: (tokens,) int.

        The Triton path computes in fp32 and rounds once; the torch path rounds cos/sin and each product to q's
        dtype as transformers does (the two differ by a couple of ulps in bf16, not at all in fp32)."""
        if self.use_triton and triton_device(q):
            return _ops().rotary_embedding(positions, q, k, self.cos_cache, self.sin_cache)
        cos = self.cos_cache[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin_cache[positions].unsqueeze(1).to(q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def inplace_ok(self, positions: torch.Tensor, qkv: torch.Tensor) -> bool:
        """Whether `forward_inplace` can run: fp32 CPU rows with unit column stride, int64 positions, one per row,
        and the native kernels built."""
        return (qkv.is_cpu and native.usable(qkv) and qkv.stride(-1) == 1 and self.cos_cache.dtype == torch.float32
                and positions.dtype == torch.int64 and positions.is_contiguous()
                and positions.shape[0] == qkv.shape[0])

    def forward_inplace(self, positions: torch.Tensor, qkv: torch.Tensor, num_heads: int, num_kv_heads: int) -> bool:
        """Rotate the q and k heads of a (tokens, (heads + 2 kv_heads) * head_dim) buffer in place with the native
        kernel; False (nothing done) where it cannot run (see `inplace_ok`)."""
        if not self.inplace_ok(positions, qkv):
            return False
        self.rotate_inplace(positions, qkv, num_heads, num_kv_heads)
        return True

    def rotate_inplace(self, positions: torch.Tensor, qkv: torch.Tensor, num_heads: int, num_kv_heads: int) -> None:
        """`forward_inplace` for a caller that already checked `inplace_ok`."""
        native.rotary_(qkv, 0, num_heads, num_heads * self.head_dim, num_kv_heads, self.head_dim, positions,
                       self.cos_cache, self.sin_cache)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

