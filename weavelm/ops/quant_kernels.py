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

import numpy as np
import torch
import torch.nn.functional as F

GROUP = 32
KERNEL_DTYPE = torch.bfloat16


def _have(op: str) -> bool:
    return hasattr(torch.ops.aten, op)


@dataclass
class Int4Pack:
    """packed: torch's CPU int4 layout of (N, K); scales_and_zeros: (K / GROUP, N, 2) in bf16; n, k: logical shape.
    w = (q - 8) * scale + zero. (Tried and dropped: keeping the zeros in fp32 and adding x's group sums times them
    outside the kernel; the default model's greedy agreement did not improve, since the kernel's bf16 activations
    and bf16 output dominate the error.)"""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    n: int
    k: int

    @classmethod
    def from_codes(cls, q: np.ndarray | torch.Tensor, scale: np.ndarray | torch.Tensor,
                   zero: np.ndarray | torch.Tensor) -> Int4Pack:
        """q: (N, K) integer codes in [0, 15]; scale, zero: (N, K / GROUP) float with w = (q - 8) * scale + zero.
        Packed in numpy, single-threaded: torch's multi-threaded copies stall on a shared, oversubscribed CPU."""
        q, scale, zero = (np.asarray(a) for a in (q, scale, zero))
        n, k = q.shape
        if k % GROUP:
            raise ValueError(f"int4 packing needs in_features divisible by {GROUP} (got {k})")
        sz = np.empty((k // GROUP, n, 2), dtype=np.float32)
        sz[..., 0], sz[..., 1] = scale.T, zero.T
        sz = torch.from_numpy(sz).to(KERNEL_DTYPE).contiguous()
        if n % 64 == 0:
            packed = torch.from_numpy(_pack_int4_blocked(q))
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(q.astype(np.int32)), 1)
        return cls(packed, sz, n, k)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(KERNEL_DTYPE), self.packed, GROUP,
                                                          self.scales_and_zeros)

    def nbytes(self) -> int:
        return self.packed.numel() + self.scales_and_zeros.numel() * 2


@dataclass
class Int8Pack:
    """q: (N, K) int8; scale: (N,) in bf16 (w = q * scale)."""

    q: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Int8Pack:
        """Symmetric per-output-channel int8 of a float weight (N, K), kept on the weight's device."""
        device = w.device
        w = w.detach().float().cpu().numpy()
        scale = torch.from_numpy(np.maximum(np.abs(w).max(axis=1) / 127.0, 1e-12)).to(KERNEL_DTYPE)
        q = np.clip(np.rint(w / scale.float().numpy()[:, None]), -127, 127).astype(np.int8)
        return cls(torch.from_numpy(q).to(device), scale.to(device))

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not _have("_weight_int8pack_mm"):
            return F.linear(x, self.q.to(x.dtype) * self.scale.to(x.dtype)[:, None])
        return torch.ops.aten._weight_int8pack_mm(x.to(KERNEL_DTYPE), self.q, self.scale)

    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 2


@dataclass
class LogitsPack:
    """The logits projection (vocabulary x hidden): an `Int8Pack` for one or two rows (decode at batch 1-2, where
    reading int8 wins: 5.1 vs 8.1 ms for 49152 x 576 on this CPU) and a bf16 copy for more rows (where torch's int8
    kernel falls behind the bf16 GEMM: 22 vs 9 ms at 8 rows)."""

    int8: Int8Pack
    wide: torch.Tensor
    max_int8_rows: int = 2

    @classmethod
    def from_dense(cls, w: torch.Tensor) -> LogitsPack:
        return cls(Int8Pack.quantize(w), w.detach().to(KERNEL_DTYPE).contiguous())

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.max_int8_rows or x.device.type != "cpu":
            return self.int8.mm(x)
        return F.linear(x.to(KERNEL_DTYPE), self.wide)


def _pack_int4_blocked(q: np.ndarray) -> np.ndarray:
    """`aten._convert_weight_to_int4pack_for_cpu(q, 1)` for N % 64 == 0, in one vectorised pass (the op takes ~30 ms
    per MB of weights, seconds for a model): rows in blocks of 64, byte (block, k, j) = q[64 block + j, k] |
    q[64 block + 32 + j, k] << 4. `tests/test_quantization.py` checks it against the op."""
    n, k = q.shape
    b = q.astype(np.uint8).reshape(n // 64, 2, 32, k)
    return np.ascontiguousarray((b[:, 0] | (b[:, 1] << 4)).transpose(0, 2, 1)).reshape(n, k // 2)


def int4_dequantize(pack: Int4Pack) -> torch.Tensor:
    """The (N, K) float weight a pack multiplies by (the identity matrix through the kernel; for tests and
    fallbacks)."""
    eye = torch.eye(pack.k, dtype=torch.float32)
    return pack.mm(eye).float().t().contiguous()


def packed_linear(pack: Int4Pack | Int8Pack | LogitsPack, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
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
