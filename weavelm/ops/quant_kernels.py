"""Weight-only quantized matmuls shared by the quantization plugins: packing and the kernels that consume packs.

Two packs, both from torch's own CPU kernels (no extra dependency):
- `Int4Pack`: 4-bit values q in [0, 15] with per-group (32 input features) scale and zero, value =
  (q - 8) * scale + zero, packed by `aten._convert_weight_to_int4pack_for_cpu` and multiplied by
  `aten._weight_int4pack_mm_for_cpu`. GGUF Q4_0 / Q4_1 / Q4_K map onto it exactly (up to the scales' bf16 rounding).
- `Int8Pack`: int8 values with one scale per output channel, multiplied by `aten._weight_int8pack_mm`.

Measured on this AVX512 CPU (torch 2.13): both kernels are vectorised only for bf16 activations (fp32 and fp16 fall
to a scalar loop 20-60x slower), so `apply` runs the matmul in bf16 and returns x's dtype. On other devices (CUDA),
or where the op is missing, `apply` dequantizes the pack into x's dtype per call: correct everywhere, fast on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

GROUP = 32
KERNEL_DTYPE = torch.bfloat16


def _have(op: str) -> bool:
    return hasattr(torch.ops.aten, op)


@dataclass
class Int4Pack:
    """packed: torch's CPU int4 layout of (N, K); scales_and_zeros: (K / GROUP, N, 2) in bf16; n, k: logical shape.
    `dense` keeps the unpacked codes for the non-CPU fallback only when built off-CPU."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    n: int
    k: int

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> Int4Pack:
        """q: (N, K) integer codes in [0, 15]; scale, zero: (N, K / GROUP) float with w = (q - 8) * scale + zero."""
        n, k = q.shape
        if k % GROUP:
            raise ValueError(f"int4 packing needs in_features divisible by {GROUP} (got {k})")
        sz = torch.stack([scale.t(), zero.t()], dim=-1).to(KERNEL_DTYPE).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        return cls(packed, sz, n, k)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(KERNEL_DTYPE), self.packed, GROUP,
                                                          self.scales_and_zeros)

    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_and_zeros.numel() * 2


@dataclass
class Int8Pack:
    """q: (N, K) int8; scale: (N,) in bf16 (w = q * scale)."""

    q: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Int8Pack:
        """Symmetric per-output-channel int8 of a float weight (N, K)."""
        w = w.float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scale.to(KERNEL_DTYPE))

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not _have("_weight_int8pack_mm"):
            return F.linear(x, self.q.to(x.dtype) * self.scale.to(x.dtype)[:, None])
        return torch.ops.aten._weight_int8pack_mm(x.to(KERNEL_DTYPE), self.q, self.scale)

    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 2


def int4_dequantize(pack: Int4Pack) -> torch.Tensor:
    """The (N, K) float weight a pack multiplies by (the identity matrix through the kernel; for tests and
    fallbacks)."""
    eye = torch.eye(pack.k, dtype=KERNEL_DTYPE)
    return pack.mm(eye).float().t().contiguous()


def packed_linear(pack: Int4Pack | Int8Pack, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) @ W^T + bias through `pack`, in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if isinstance(pack, Int4Pack) and x.device.type != "cpu":
        y = F.linear(x2, pack_dense_cache(pack, x))
    else:
        y = pack.mm(x2)
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], y.shape[-1])


def pack_dense_cache(pack: Int4Pack, x: torch.Tensor) -> torch.Tensor:
    dense = getattr(pack, "_dense", None)
    if dense is None or dense.device != x.device or dense.dtype != x.dtype:
        dense = int4_dequantize(pack).to(device=x.device, dtype=x.dtype)
        pack._dense = dense
    return dense
