"""Weight-only quantized matmuls shared by the quantization plugins: packing and the kernels that consume packs.

The fp32 CPU path (the default) uses weavelm's native kernels (`weavelm.ops.native`), which keep llama.cpp's
32-element blocks and compute with fp32 activations and fp32 accumulation:
- `BlockQ4Pack`: 4-bit codes with per-block scale d and min m (w = d * q + m): GGUF Q4_0 / Q4_1 / Q4_K exactly;
- `BlockQ8Pack`: int8 codes with per-block scale (w = d * q): GGUF Q8_0 exactly, other GGUF types re-quantized
  per block, and the `int8` plugin's per-channel codes (each row's scale repeated over its blocks).
Their result equals the dequantized fp32 model's up to rounding order. Up to `NATIVE_MAX_ROWS` activation rows run
through the blocked kernel; wider inputs (prefill) dequantize the weight once per call and run torch's fp32 GEMM.

Where the native kernels cannot run (no C compiler) or activations are not fp32 (`dtype: bfloat16`), two packs
from torch's own CPU kernels:
- `Int4Pack`: 4-bit values q in [0, 15] with per-group (32 input features) scale and zero, value =
  (q - 8) * scale + zero, packed by `aten._convert_weight_to_int4pack_for_cpu` and multiplied by
  `aten._weight_int4pack_mm_for_cpu`. GGUF Q4_0 / Q4_1 / Q4_K map onto it exactly (up to the scales' bf16 rounding).
- `Int8Pack`: int8 values with one scale per output channel, multiplied by `aten._weight_int8pack_mm`.

Measured on this AVX512 CPU (torch 2.13): both kernels are vectorised only for bf16 activations (fp32 and fp16 fall
to a scalar loop 20-60x slower), so `apply` runs the matmul in bf16 and returns x's dtype. On other devices (CUDA),
or where the op is missing, `apply` dequantizes the pack into x's dtype per call: correct everywhere, fast on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from weavelm.ops import native

GROUP = 32
KERNEL_DTYPE = torch.bfloat16
NATIVE_MAX_ROWS = 32  # measured crossover of the blocked kernel against dequantize + fp32 GEMM (RESULTS.md)


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

    def blocks(self) -> BlockQ8Pack:
        """The same codes as a `BlockQ8Pack` (each row's scale repeated per block), built once: what the native fp32
        kernels multiply."""
        blocks = getattr(self, "_blocks", None)
        if blocks is None:
            blocks = self._blocks = BlockQ8Pack.from_per_channel(self.q, self.scale)
        return blocks

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        if native.usable(x):
            return self.blocks().mm(x)
        if x.device.type != "cpu" or not _have("_weight_int8pack_mm"):
            return F.linear(x, self.q.to(x.dtype) * self.scale.to(x.dtype)[:, None])
        return torch.ops.aten._weight_int8pack_mm(x.to(KERNEL_DTYPE), self.q, self.scale)

    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 2


@dataclass
class LogitsPack:
    """The logits projection (vocabulary x hidden): an `Int8Pack` for one or two rows (decode at batch 1-2, where
    reading int8 wins: 5.1 vs 8.1 ms for 49152 x 576 on this CPU) and, on torch's kernels, a bf16 GEMM for more
    rows (where torch's int8 kernel falls behind it: 22 vs 9 ms at 8 rows). `dense` is the embedding's own weight
    (kept for row lookup, not a copy); its bf16 copy is made on the first wide call, so the native path, which
    runs every row count on the int8 codes, never holds one."""

    int8: Int8Pack
    dense: torch.Tensor
    max_int8_rows: int = 2
    _wide: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_dense(cls, w: torch.Tensor) -> LogitsPack:
        return cls(Int8Pack.quantize(w), w.detach())

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.max_int8_rows or x.device.type != "cpu" or native.usable(x):
            return self.int8.mm(x)
        if self._wide is None:
            self._wide = self.dense.to(KERNEL_DTYPE).contiguous()
        return F.linear(x.to(KERNEL_DTYPE), self._wide)


@dataclass
class BlockQ4Pack:
    """4-bit codes in llama.cpp's block order for the native kernel: codes (N, K / 2) uint8, block b of row n in
    bytes [16 b, 16 b + 16), element 32 b + j the low nibble of byte j and 32 b + 16 + j its high nibble (Q4_0 and
    Q4_1 store exactly this); d, m (N, K / 32) fp32 with w = d * q + m."""

    codes: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor
    n: int
    k: int

    @classmethod
    def from_codes(cls, q: np.ndarray, d: np.ndarray, m: np.ndarray) -> BlockQ4Pack:
        """q (N, K) integer codes in [0, 15]; d, m (N, K / 32) with w = d * q + m."""
        q = np.asarray(q)
        n, k = q.shape
        if k % GROUP:
            raise ValueError(f"block packing needs in_features divisible by {GROUP} (got {k})")
        b = q.astype(np.uint8).reshape(n, k // GROUP, 2, 16)
        codes = np.ascontiguousarray(b[:, :, 0] | (b[:, :, 1] << 4)).reshape(n, k // 2)
        as_f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
        return cls(torch.from_numpy(codes), as_f32(d), as_f32(m), n, k)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if native.available():
            return native.dequant_q4(self.codes, self.d, self.m, self.n, self.k).to(dtype)
        c = self.codes.view(self.n, -1, 16)
        q = torch.stack([c & 15, c >> 4], dim=2).reshape(self.n, -1, GROUP).float()
        return (q * self.d[..., None] + self.m[..., None]).reshape(self.n, self.k).to(dtype)

    def mm(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (M, K) -> (M, N) (+ bias), in x's dtype."""
        if native.usable(x) and x.shape[0] <= NATIVE_MAX_ROWS and x.stride(-1) == 1 and \
                (bias is None or native.usable(bias)):
            return native.q4_gemm(x, self.codes, self.d, self.m, self.n, bias)
        return F.linear(x, self.dequantize(x.dtype).to(x.device), bias)

    def nbytes(self) -> int:
        return self.codes.numel() + (self.d.numel() + self.m.numel()) * 4


@dataclass
class BlockQ8Pack:
    """int8 codes (N, K) with one fp32 scale per 32-element block, d (N, K / 32): w = d * q."""

    codes: torch.Tensor
    d: torch.Tensor
    n: int
    k: int

    @classmethod
    def from_codes(cls, q: np.ndarray | torch.Tensor, d: np.ndarray | torch.Tensor) -> BlockQ8Pack:
        q = torch.as_tensor(np.asarray(q)).to(torch.int8).contiguous()
        d = torch.as_tensor(np.asarray(d, dtype=np.float32)).contiguous()
        n, k = q.shape
        if k % GROUP or d.shape != (n, k // GROUP):
            raise ValueError(f"block int8 needs in_features divisible by {GROUP} and (N, K / {GROUP}) scales")
        return cls(q, d, n, k)

    @classmethod
    def quantize(cls, w: torch.Tensor) -> BlockQ8Pack:
        """Symmetric int8 per 32-element block of a float weight (N, K)."""
        w = w.detach().float().cpu().numpy()
        n, k = w.shape
        blocks = w.reshape(n, k // GROUP, GROUP)
        d = np.abs(blocks).max(axis=-1) / 127.0
        safe = np.where(d > 0, d, 1.0)
        q = np.clip(np.rint(blocks / safe[..., None]), -127, 127).astype(np.int8).reshape(n, k)
        return cls.from_codes(q, d.astype(np.float32))

    @classmethod
    def from_per_channel(cls, q: torch.Tensor, scale: torch.Tensor) -> BlockQ8Pack:
        """Per-output-channel int8 (q (N, K), scale (N,)) as blocks: the same values, each row's scale repeated."""
        n, k = q.shape
        return cls.from_codes(q.cpu().contiguous(), scale.float().cpu()[:, None].expand(n, k // GROUP).contiguous())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if native.available():
            return native.dequant_q8(self.codes, self.d, self.n, self.k).to(dtype)
        return (self.codes.view(self.n, -1, GROUP).float() * self.d[..., None]).reshape(self.n, self.k).to(dtype)

    def mm(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (M, K) -> (M, N) (+ bias), in x's dtype."""
        if native.usable(x) and x.shape[0] <= NATIVE_MAX_ROWS and x.stride(-1) == 1 and \
                (bias is None or native.usable(bias)):
            return native.q8_gemm(x, self.codes, self.d, self.n, bias)
        return F.linear(x, self.dequantize(x.dtype).to(x.device), bias)

    def nbytes(self) -> int:
        return self.codes.numel() + self.d.numel() * 4


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


def packed_linear(pack: Int4Pack | Int8Pack | LogitsPack | BlockQ4Pack | BlockQ8Pack, x: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) @ W^T + bias through `pack`, in x's dtype."""
    if type(pack) in (BlockQ4Pack, BlockQ8Pack):
        if x.dim() == 2:
            return pack.mm(x, bias)
        return pack.mm(x.reshape(-1, x.shape[-1]), bias).reshape(*x.shape[:-1], pack.n)
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
