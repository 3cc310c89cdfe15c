"""4-bit weight-only linear layers (GPTQ, AWQ, compressed-tensors W4A16): one resident form and the kernels that
multiply it.

Every int4 checkpoint format is converted once, after loading, into `Int4Weight` (GPTQ's own layout, which the
Triton kernel reads directly):
- qweight (K / 8, N) int32: input feature k = 8 r + j of output n is bits [4 j, 4 j + 4) of qweight[r, n];
- scales, zeros (G, N) float: w[n, k] = (q[k, n] - zeros[g, n]) * scales[g, n] with g = k // group_size
  (zeros are the unsigned zero points, integers 0..15);
- perm (K,) int64 or None: the stored K order is `x[:, perm]` (GPTQ's act-order, `desc_act` with `g_idx`: features are
  sorted by group once at load so that each group is contiguous, and activations are gathered per call).

Where it runs (`Int4Weight.mm` / `int4_linear`):
- CUDA, fp16/bf16 activations: the Triton GEMM (`weavelm.ops.triton_int_gemm`: each K tile of the weight is
  dequantized in registers and fed to `tl.dot` in the activation dtype, accumulated in fp32). From
  `DENSE_MIN_ROWS` rows on (prefill), a Triton pass writes the layer's weight in the activation dtype once per call
  (a transient (K, N) tensor) and cuBLAS multiplies it, as vLLM's AWQ path does.
- CPU, fp32 activations and the native kernels available, group_size a multiple of 32 (or one group, K % 32 == 0):
  repacked once into the native `BlockQ4Pack` (d = scale, m = -scale * zero per 32-element block; the same values up
  to fp32 rounding order), so `QuantizeMethodBase.native_pack` hands it to the native decoder stack too.
- CPU, bf16 activations, the same group sizes: torch's int4 pack and bf16 kernel (`quant_kernels.Int4Pack`, scales
  and zeros rounded to bf16).
- Anything else (other group sizes, no C compiler with fp32, fp32 on CUDA): the int4 codes stay resident and are
  dequantized per call into x's dtype (correct everywhere, not fast).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from weavelm.ops import native
from weavelm.ops.quant_kernels import GROUP, BlockQ4Pack, Int4Pack, packed_linear

PACK = 8  # int4 values per int32
TORCH_INT4_OP = "_weight_int4pack_mm_for_cpu"
DENSE_MIN_ROWS = 256  # from here on a CUDA call dequantizes once and runs cuBLAS (vLLM's AWQ threshold)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """(R, C) int32 holding 8 nibbles each, low nibble first -> (8 R, C) uint8: row 8 r + j is nibble j of row r."""
    r, c = packed.shape
    nib = (packed.unsqueeze(1) >> _SHIFTS.to(packed.device)[None, :, None]) & 0xF
    return nib.reshape(r * PACK, c).to(torch.uint8)


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of `unpack_rows`: (8 R, C) integer codes 0..15 -> (R, C) int32."""
    k, c = codes.shape
    nib = codes.to(torch.int64).reshape(k // PACK, PACK, c) << _SHIFTS.to(torch.int64).to(codes.device)[None, :, None]
    out = nib.sum(dim=1)
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)


@dataclass
class Int4Weight:
    """A linear layer's int4 weight in the resident form above; `n`, `k`: output and input features."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    perm: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.qweight.shape[1]

    @property
    def k(self) -> int:
        return self.qweight.shape[0] * PACK

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                   perm: torch.Tensor | None = None) -> Int4Weight:
        """codes (K, N) integers 0..15 in the stored K order; scales, zeros (G, N)."""
        return cls(pack_rows(codes), scales, zeros, group_size, perm)

    def codes(self) -> torch.Tensor:
        """(K, N) uint8 in the stored K order."""
        return unpack_rows(self.qweight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (N, K) weight in the checkpoint's (logical) K order: (q - zero) * scale computed in fp32."""
        g = torch.arange(self.k, device=self.qweight.device) // self.group_size
        w = (self.codes().float() - self.zeros.float()[g]) * self.scales.float()[g]
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(0, self.perm, w)
        return w.t().to(dtype)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Int4Weight:
        """On `device`, with scales and zeros in `dtype` (the activation dtype the kernels take)."""
        perm = None if self.perm is None else self.perm.to(device)
        return Int4Weight(self.qweight.to(device).contiguous(), self.scales.to(device, dtype).contiguous(),
                          self.zeros.to(device, dtype).contiguous(), self.group_size, perm)

    def block_pack(self) -> BlockQ4Pack | None:
        """The same values as the native kernels' 32-element blocks (stored K order), or None when the groups do
        not cover whole blocks."""
        if self.group_size % GROUP or self.k % GROUP:
            return None
        rep = self.group_size // GROUP
        s = self.scales.float().cpu().numpy()
        z = self.zeros.float().cpu().numpy()
        d = np.repeat(s.T, rep, axis=1)
        m = np.repeat((-s * z).T, rep, axis=1)
        return BlockQ4Pack.from_codes(self.codes().t().cpu().numpy(), d, m)

    def torch_pack(self) -> Int4Pack | None:
        """The same values as torch's CPU int4 pack (bf16 kernel, 32-element groups: value = (q - 8) * scale + zero,
        so zero = scale * (8 - zero point)), in the stored K order; None when the groups do not cover whole 32s."""
        if self.group_size % GROUP or self.k % GROUP:
            return None
        rep = self.group_size // GROUP
        s = self.scales.float().cpu().numpy()
        z = self.zeros.float().cpu().numpy()
        return Int4Pack.from_codes(self.codes().t().cpu().numpy(), np.repeat(s.T, rep, axis=1),
                                   np.repeat((s * (8 - z)).T, rep, axis=1))

    def nbytes(self) -> int:
        extra = 0 if self.perm is None else self.perm.numel() * self.perm.element_size()
        return (self.qweight.numel() * 4 + self.scales.numel() * self.scales.element_size()
                + self.zeros.numel() * self.zeros.element_size() + extra)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) -> (M, N) in x's dtype."""
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            from weavelm.ops.triton_int_gemm import int4_dequantize, int4_gemm
            if x.shape[0] < DENSE_MIN_ROWS:
                return int4_gemm(x, self.qweight, self.scales, self.zeros, self.group_size)
            return x @ int4_dequantize(self.qweight, self.scales, self.zeros, self.group_size, x.dtype)
        return F.linear(x, self._stored_order_dense(x.dtype))

    def _stored_order_dense(self, dtype: torch.dtype) -> torch.Tensor:
        g = torch.arange(self.k, device=self.qweight.device) // self.group_size
        return ((self.codes().float() - self.zeros.float()[g]) * self.scales.float()[g]).t().to(dtype)


@dataclass
class Int4Linear:
    """What a layer holds after loading: its `Int4Weight`, or on the CPU a pack built from it (then the only copy
    kept: `weight` is None): the native fp32 blocks, or torch's bf16 int4 pack."""

    weight: Int4Weight | None
    blocks: BlockQ4Pack | Int4Pack | None = None
    perm: torch.Tensor | None = None

    @classmethod
    def prepare(cls, weight: Int4Weight, device: torch.device, dtype: torch.dtype) -> Int4Linear:
        """Choose the kernel once for `device` and activation `dtype` (see the module docstring)."""
        if device.type == "cpu" and dtype == torch.float32 and native.available():
            blocks = weight.block_pack()
            if blocks is not None:
                return cls(None, blocks, weight.perm)
        if device.type == "cpu" and dtype == torch.bfloat16 and hasattr(torch.ops.aten, TORCH_INT4_OP):
            pack = weight.torch_pack()
            if pack is not None:
                return cls(None, pack, weight.perm)
        return cls(weight.to(device, dtype))

    @property
    def kernel(self) -> str:
        if isinstance(self.blocks, BlockQ4Pack):
            return "int4-native-blocks"
        if self.blocks is not None:
            return "int4-torch-bf16"
        return "int4-triton" if self.weight.qweight.is_cuda else "int4-dequant-per-call"

    def native_pack(self) -> BlockQ4Pack | None:
        return self.blocks if self.perm is None and isinstance(self.blocks, BlockQ4Pack) else None

    def nbytes(self) -> int:
        return self.blocks.nbytes() if self.blocks is not None else self.weight.nbytes()


def int4_linear(layer_pack: Int4Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) @ W^T + bias through an `Int4Linear`, in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if layer_pack.blocks is not None:
        if layer_pack.perm is not None:
            x2 = x2.index_select(1, layer_pack.perm)
        y = packed_linear(layer_pack.blocks, x2.contiguous(), bias)
    else:
        y = layer_pack.weight.mm(x2)
        if bias is not None:
            y = y + bias
    return y.reshape(*shape[:-1], y.shape[-1])
