"""GGUF (llama.cpp) quantized blocks decoded into the codes, scales and zeros of `weavelm.ops.quant_kernels`.

Each function takes one tensor's raw rows, `(rows, bytes_per_row)` uint8 as stored (rows already in Hugging Face
order), and returns `(q, scale, zero)`: q (rows, K) uint8 in [0, 15], scale and zero (rows, K / 32) float32 with
`w = (q - 8) * scale + zero`, which is exactly llama.cpp's dequantization for these types:
- Q4_0 (blocks of 32: d fp16, 16 bytes of nibbles): w = d * (q - 8)
- Q4_1 (d, m fp16, nibbles): w = d * q + m
- Q4_K (super-blocks of 256: d, dmin fp16, 12 bytes of 6-bit sub-scales/mins, 128 bytes of nibbles; 8 sub-blocks
  of 32): w = d * sc_j * q - dmin * m_j
Within a 32-block, elements 0..15 are the low nibbles of the block's 16 bytes and 16..31 the high ones (Q4_K: each
64 elements share 32 bytes, low nibbles first).
"""

from __future__ import annotations

import numpy as np
import torch

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., 16*j) bytes -> (..., 2, 16*j): low nibbles then high nibbles."""
    return np.stack([qs & 0x0F, qs >> 4], axis=-2)


def decode_int4(ggml_type: str, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, scale, zero) with w = (q - 8) * scale + zero (torch's int4 pack convention)."""
    q, d, m = decode_int4_dm(ggml_type, raw)
    return q, d, m + 8.0 * d


def decode_int4_dm(ggml_type: str, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, d, m) with w = d * q + m, llama.cpp's own per-32 values (the native kernel's convention)."""
    rows = raw.shape[0]
    if ggml_type in ("Q4_0", "Q4_1"):
        head = 2 if ggml_type == "Q4_0" else 4
        blocks = raw.reshape(rows, -1, head + 16)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        q = _nibbles(blocks[..., head:]).reshape(rows, -1)
        if ggml_type == "Q4_0":
            m = -8.0 * d
        else:
            m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    elif ggml_type == "Q4_K":
        blocks = raw.reshape(rows, -1, 144)
        nb = blocks.shape[1]
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        dmin = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        sc, mn = _scale_min_k4(blocks[..., 4:16].reshape(-1, 12))
        sc, mn = sc.reshape(rows, nb, 8).astype(np.float32), mn.reshape(rows, nb, 8).astype(np.float32)
        q = _nibbles(blocks[..., 16:].reshape(rows, nb, 4, 32)).reshape(rows, -1)
        d, m = (d[..., None] * sc).reshape(rows, -1), (-(dmin[..., None] * mn)).reshape(rows, -1)
    else:
        raise ValueError(f"{ggml_type} is not a 4-bit GGUF type ({', '.join(INT4_TYPES)})")
    return np.ascontiguousarray(q), np.ascontiguousarray(d), np.ascontiguousarray(m)


def decode_q8_0(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 rows (blocks of 32: d fp16, 32 int8) -> (codes (rows, K) int8, d (rows, K / 32) fp32), w = d * q."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(rows, -1)
    return q, np.ascontiguousarray(d)


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's `get_scale_min_k4` for (n, 12) bytes -> (n, 8) 6-bit scales and mins."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def dequantize(ggml_type: str, raw: np.ndarray, cols: int) -> torch.Tensor:
    """Any GGUF type's raw rows -> (rows, cols) float32, through the `gguf` package (the reference)."""
    import gguf

    out = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[ggml_type])
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(raw.shape[0], cols)
