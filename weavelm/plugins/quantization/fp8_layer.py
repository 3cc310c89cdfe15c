"""The fp8 linear method shared by the `fp8` and `compressed-tensors-fp8` schemes (not a plugin itself).

A claimed layer holds, from `create_weights` on (the engine's dense weight is swapped out before any data is
written to it, so its pages are never touched):
- `weight`: (out per rank, in per rank) float8_e4m3fn;
- the scale, float32, named as the checkpoint names it: `weight_scale_inv` (block checkpoints: one per
  `weight_block_size` block) or `weight_scale` (per-tensor / per-channel checkpoints, and on-the-fly
  quantization); in memory always `weavelm.ops.fp8_kernels`' layout `(cdiv(N, gn), cdiv(K, gk))` with
  `self.group = (gn, gk)`: block (128, 128), or (1, 128) when a fused layer's part boundaries are not multiples of
  the block rows (each row then carries its block's scale: exact), or (1, K) for one scale per row (a per-tensor
  checkpoint's scale is repeated over its part's rows, so fused parts keep their own scales exactly);
- `input_scale` (static activation checkpoints): one per part, reduced to their maximum after loading.

Each parameter's `weight_loader(param, loaded, shard_id)` takes the whole checkpoint tensor of one part (or the
fused tensor) and checks its dtype and shape before copying this rank's rows: a ValueError here becomes a LoadError
naming the tensor (`load_checkpoint` adds the name). On-the-fly (`from_float`), each arriving part is quantized per
output channel as it loads: the dense weight never exists in memory.

`apply`: W8A8 on CUDA with fp8 (sm89+): per-token dynamic (or the checkpoint's static) activation scales with
`torch._scaled_mm` for row scales, per-token-group-of-gk scales with the Triton block GEMM for blocks. Elsewhere
weight-only: the weight is dequantized into the activation dtype per call.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from weavelm.core.model_files import materialize, narrow_or_slice
from weavelm.core.quantization import CheckpointTensor, QuantizeMethodBase
from weavelm.errors import ConfigError
from weavelm.layers.linear import OutputSegment
from weavelm.ops import fp8_kernels as fp8
from weavelm.utils import cdiv


@dataclass(frozen=True)
class Fp8Format:
    """How a layer's fp8 weight is stored in the checkpoint.

    block: (rows, columns) of one `weight_scale_inv` block (e.g. (128, 128)), or None for one `weight_scale` per
    part (shape () or (1,)) or per output channel ((rows, 1) or (rows,)).
    from_float: the checkpoint holds float weights, quantized per output channel at load (no scale tensors).
    static_input: the checkpoint holds an `input_scale` per part (activation_scheme static).
    """

    block: tuple[int, int] | None = None
    from_float: bool = False
    static_input: bool = False

    @property
    def scale_name(self) -> str:
        return "weight_scale_inv" if self.block is not None else "weight_scale"


@dataclass(frozen=True)
class _Geometry:
    """One rank's view of a layer: `parts` (checkpoint part -> rows of this rank), the whole input width, and where
    this rank's columns start in it."""

    parts: list[OutputSegment]
    k_full: int
    k_start: int
    k_local: int


def _geometry(layer: nn.Module) -> _Geometry:
    n, k = layer.weight.shape
    if hasattr(layer, "output_segments"):  # column-parallel: rows split, all input columns
        return _Geometry(layer.output_segments(), k, 0, k)
    tp = layer.tp  # row-parallel: all rows, columns split
    return _Geometry([OutputSegment(n, 0, n, 0)], k * tp.world_size, k * tp.rank, k)


def _slices(layer: nn.Module, geo: _Geometry, shard_id: object) -> tuple[list[tuple[OutputSegment, int]], int]:
    """`([(segment, row of its part in the checkpoint tensor)], rows of that tensor)` for a tensor of `shard_id`."""
    if shard_id is None:
        out, base = [], 0
        for seg in geo.parts:
            out.append((seg, base))
            base += seg.whole
        return out, base
    seg = geo.parts[layer.shard_index(shard_id)]
    return [(seg, 0)], seg.whole


class Fp8LinearMethod(QuantizeMethodBase):
    """One linear layer's fp8 weight (see the module docstring). `kind` names what runs, for logs."""

    def __init__(self, fmt: Fp8Format):
        self.fmt = fmt
        self.group: tuple[int, int] = (1, 1)
        self.kind = "fp8"
        self.mode = "weight-only"

    # -- creating and loading ------------------------------------------------------------------------------
    def create_weights(self, layer: nn.Module) -> None:
        dense = layer.weight
        n, k = dense.shape
        geo = _geometry(layer)
        if self.fmt.block is not None:
            bn, bk = self.fmt.block
            if geo.k_start % bk:
                raise ConfigError([("executor.tensor_parallel_size", f"{type(layer).__name__}: rank "
                                    f"{layer.tp.rank}'s input columns start at {geo.k_start}, inside a {bk}-column "
                                    f"block of the fp8 checkpoint; use a tensor-parallel size that splits the "
                                    f"input features ({geo.k_full}) in multiples of {bk}")])
            self.group = (bn if self._rows_aligned(geo, bn) else 1, bk)
        else:
            self.group = (1, k)
        self.kind = f"fp8-{'block' if self.fmt.block else 'channel'}"
        weight = nn.Parameter(torch.empty((n, k), dtype=fp8.FP8_DTYPE, device=dense.device), requires_grad=False)
        scale = torch.ones((cdiv(n, self.group[0]), cdiv(k, self.group[1])), dtype=torch.float32,
                            device=dense.device)
        del layer.weight
        layer.weight = weight
        if self.fmt.from_float:
            weight.weight_loader = self._loader(layer, self._load_float)
            layer.register_buffer(self.fmt.scale_name, scale, persistent=False)
            return
        weight.weight_loader = self._loader(layer, self._load_fp8)
        scale = nn.Parameter(scale, requires_grad=False)
        scale.weight_loader = self._loader(layer, self._load_block_scale if self.fmt.block else self._load_row_scale)
        layer.register_parameter(self.fmt.scale_name, scale)
        if self.fmt.static_input:
            inp = nn.Parameter(torch.zeros(len(geo.parts), dtype=torch.float32, device=dense.device),
                               requires_grad=False)
            inp.weight_loader = self._loader(layer, self._load_input_scale)
            layer.register_parameter("input_scale", inp)

    @staticmethod
    def _rows_aligned(geo: _Geometry, bn: int) -> bool:
        """Whether every part's rows of this rank start on a block row in both the checkpoint and the layer, so
        the checkpoint's block rows map onto the layer's (else one scale row per weight row is kept)."""
        base = 0
        for i, seg in enumerate(geo.parts):
            last = i == len(geo.parts) - 1
            if seg.offset % bn or seg.start % bn or base % bn or (seg.size % bn and not last):
                return False
            base += seg.whole
        return True

    def checkpoint_tensors(self, layer: nn.Module, shape: tuple[int, ...]) -> dict[str, CheckpointTensor] | None:
        if self.fmt.from_float:
            return None
        out = {"weight": CheckpointTensor(tuple(shape), fp8.FP8_DTYPE)}
        if self.fmt.block is not None:
            bn, bk = self.fmt.block
            out["weight_scale_inv"] = CheckpointTensor((cdiv(shape[0], bn), cdiv(shape[1], bk)))
        else:
            out["weight_scale"] = CheckpointTensor(None)  # () / (1,) per tensor or (rows, 1) per channel
        if self.fmt.static_input:
            out["input_scale"] = CheckpointTensor(None)
        return out

    def _loader(self, layer: nn.Module, load):
        def weight_loader(param: nn.Parameter, loaded, shard_id: object = None) -> None:
            load(layer, param, loaded, shard_id)
        return weight_loader

    def _load_fp8(self, layer, param, loaded, shard_id) -> None:
        if loaded.dtype != fp8.FP8_DTYPE:
            raise ValueError(f"has dtype {str(loaded.dtype).removeprefix('torch.')}, but the checkpoint's "
                             f"quantization_config says fp8: its weights must be float8_e4m3fn (re-export the "
                             f"checkpoint, or drop quantization_config from config.json for a float checkpoint)")
        layer.weight_loader(param, loaded, shard_id)  # the layer's own sharding (shape checked there)

    def _load_float(self, layer, param, loaded, shard_id) -> None:
        if not loaded.dtype.is_floating_point or loaded.dtype.itemsize == 1:
            raise ValueError(f"has dtype {loaded.dtype}; on-the-fly fp8 quantization takes float16/bfloat16/float32 "
                             f"weights (a quantized checkpoint runs with quantization: auto)")
        geo = _geometry(layer)
        slices, rows = _slices(layer, geo, shard_id)
        _check_shape(loaded, (rows, geo.k_full))
        scale = getattr(layer, self.fmt.scale_name)
        for seg, base in slices:
            part = narrow_or_slice(loaded, 0, base + seg.start, seg.size)
            if geo.k_local != geo.k_full:
                part = part.narrow(1, geo.k_start, geo.k_local)
            q, s = fp8.quantize(part.to(param.device), self.group)
            with torch.no_grad():
                param.data[seg.offset:seg.offset + seg.size].copy_(q)
                scale[seg.offset:seg.offset + seg.size].copy_(s)

    def _load_block_scale(self, layer, param, loaded, shard_id) -> None:
        geo = _geometry(layer)
        bn, bk = self.fmt.block
        slices, rows = _slices(layer, geo, shard_id)
        _check_scale_dtype(loaded)
        _check_shape(loaded, (cdiv(rows, bn), cdiv(geo.k_full, bk)))
        cols = narrow_or_slice(loaded, 1, geo.k_start // bk, cdiv(geo.k_local, bk)).float()
        gn = self.group[0]
        with torch.no_grad():
            for seg, base in slices:
                first = base + seg.start
                if gn == 1:  # one scale row per weight row
                    src = cols[first // bn:cdiv(first + seg.size, bn)].repeat_interleave(bn, 0)
                    param.data[seg.offset:seg.offset + seg.size].copy_(src[first % bn:first % bn + seg.size])
                else:
                    count = cdiv(seg.size, bn)
                    param.data[seg.offset // bn:seg.offset // bn + count].copy_(cols[first // bn:first // bn + count])

    def _load_row_scale(self, layer, param, loaded, shard_id) -> None:
        geo = _geometry(layer)
        slices, rows = _slices(layer, geo, shard_id)
        _check_scale_dtype(loaded)
        t = materialize(loaded).float()
        if tuple(t.shape) in ((), (1,)):
            t = t.reshape(1, 1).expand(rows, 1)
        elif tuple(t.shape) in ((rows,), (rows, 1)):
            t = t.reshape(rows, 1)
        else:
            raise ValueError(f"has shape {tuple(loaded.shape)}, but an fp8 weight_scale is one per tensor (() or "
                             f"(1,)) or one per output channel (({rows}, 1)) for this {rows}-row weight")
        with torch.no_grad():
            for seg, base in slices:
                param.data[seg.offset:seg.offset + seg.size].copy_(t[base + seg.start:base + seg.start + seg.size])

    def _load_input_scale(self, layer, param, loaded, shard_id) -> None:
        _check_scale_dtype(loaded)
        if math.prod(loaded.shape) != 1:
            raise ValueError(f"has shape {tuple(loaded.shape)}, but a static fp8 input_scale is one number")
        value = materialize(loaded).float().reshape(1)
        index = slice(None) if shard_id is None else layer.shard_index(shard_id)
        with torch.no_grad():
            param.data[index] = value

    # -- after loading and on every forward ---------------------------------------------------------------
    def process_weights_after_loading(self, layer: nn.Module) -> None:
        inp = getattr(layer, "input_scale", None)
        if inp is not None:
            layer.input_scale = nn.Parameter(inp.data.max().reshape(1), requires_grad=False)
        weight = layer.weight
        if not fp8.fp8_supported(weight.device):
            self.mode = "weight-only"
        elif self.group[1] >= weight.shape[1]:
            self.mode = "w8a8-scaled-mm" if fp8.can_scaled_mm(weight) else "weight-only"
        else:
            self.mode = "w8a8-block-triton" if self.group[1] >= 16 else "weight-only"

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        scale = getattr(layer, self.fmt.scale_name)
        if self.mode == "w8a8-scaled-mm":
            return fp8.scaled_mm_rowwise(x, layer.weight, scale, bias, getattr(layer, "input_scale", None))
        if self.mode == "w8a8-block-triton":
            from weavelm.ops.fp8_triton import block_scaled_mm

            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            q, x_scale = fp8.quantize_per_token_group(x2, self.group[1])
            out = block_scaled_mm(q, x_scale, layer.weight, scale, self.group, x.dtype, bias)
            return out.reshape(*shape[:-1], out.shape[-1])
        return fp8.weight_only_linear(x, layer.weight, scale, self.group, bias)


def _check_shape(loaded, expected: tuple[int, ...]) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"has shape {tuple(loaded.shape)}, the model expects {tuple(expected)}; the checkpoint does "
                         f"not match config.json and its quantization_config")


def _check_scale_dtype(loaded) -> None:
    if not loaded.dtype.is_floating_point or loaded.dtype.itemsize == 1:
        raise ValueError(f"has dtype {str(loaded.dtype).removeprefix('torch.')}; fp8 scales are float32 (or "
                         f"bfloat16/float16)")


def how_it_runs(device: str) -> str:
    """How fp8 layers compute on `device` ("cpu" / "cuda" of this machine), for `weavelm plugins`."""
    import torch

    if device == "cuda" and torch.cuda.is_available() and fp8.fp8_supported(torch.device("cuda")):
        return "W8A8: torch._scaled_mm (per-channel), Triton block GEMM (blocks); weights fp8"
    return f"weight-only on {device} (no fp8 GEMM here): weights stay fp8, dequantized per call"


# checkpoint part -> the engine's packed layer (the standard decoders' `packed_modules_mapping`)
PACKED_PARTS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
                "up_proj": "gate_up_proj"}


def is_ignored(prefix: str, patterns: tuple[str, ...]) -> bool:
    """Whether the engine layer `prefix` (e.g. `layers.0.self_attn.qkv_proj`) is one a checkpoint's ignore list
    names (Hugging Face module names, e.g. `model.layers.0.self_attn.q_proj` or `lm_head`; `re:` for a regular
    expression, as compressed-tensors writes them). A packed layer is ignored when any of its parts is (its parts
    are then stored in full precision alike)."""
    if not patterns:
        return False
    for pattern in patterns:
        regex = pattern[3:] if pattern.startswith("re:") else None
        name = pattern.removeprefix("model.") if regex is None else None
        for candidate in (prefix, f"model.{prefix}"):
            if regex is not None:
                if re.fullmatch(regex, candidate) or any(re.fullmatch(regex, _with_leaf(candidate, part))
                                                         for part in _parts(candidate)):
                    return True
            elif candidate == name or _packed(name) == candidate:
                return True
    return False


def _packed(name: str) -> str:
    head, _, leaf = name.rpartition(".")
    return f"{head}.{PACKED_PARTS.get(leaf, leaf)}" if head else PACKED_PARTS.get(leaf, leaf)


def _parts(name: str) -> list[str]:
    leaf = name.rpartition(".")[2]
    return [part for part, packed in PACKED_PARTS.items() if packed == leaf]


def _with_leaf(name: str, leaf: str) -> str:
    head = name.rpartition(".")[0]
    return f"{head}.{leaf}" if head else leaf
