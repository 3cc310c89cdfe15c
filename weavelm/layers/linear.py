"""Tensor-parallel linear layers (vLLM's shapes), each holding only its rank's shard.

Every parameter carries `weight_loader(param, loaded, shard_id=None)`, which checks the FULL checkpoint tensor's
shape and copies in only this rank's slice; `loaded` is a tensor or a `LazyTensor`, so only the shard is read.

- `ColumnParallelLinear`: output features split across ranks (weight rows); no communication.
- `MergedColumnParallelLinear`: several column-parallel outputs in one matmul (gate/up), each split across ranks;
  loads either its parts one at a time (`shard_id` = index) or one fused checkpoint tensor (`shard_id=None`).
- `QKVParallelLinear`: fused Q/K/V split by heads (`shard_id` "q" / "k" / "v", or None for a fused `qkv_proj`
  tensor). With fewer KV heads than ranks each rank holds one KV head, replicated on `world_size // num_kv_heads`
  ranks (vLLM's rule), so a rank's query heads always find theirs.
- `RowParallelLinear`: input features split (weight columns); partial outputs are summed with an all-reduce, the
  bias added once (by rank 0 before the sum).

On one rank every layer is a plain `F.linear` over the full weight: no collective, no extra copy.

`output_segments()` describes a column-parallel layer's output as the checkpoint's parts (whole size, and where
this rank's rows sit), which the loaders above and LoRA's sharding both follow.

Quantization (`weavelm.core.quantization`): a layer's matmul goes through `linear_apply`, which runs
`layer.quant_method.apply(layer, x, bias)` when a quantization config attached a method to the layer (its weight is
then the method's pack, and `layer.weight` may be None), else `F.linear` on the dense weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from weavelm.core.model_files import LazyTensor, materialize, narrow_or_slice
from weavelm.distributed import TensorParallelGroup

Loaded = torch.Tensor | LazyTensor


def copy_shard(target: torch.Tensor, loaded: Loaded, full_shape: tuple[int, ...], dim: int | None = None,
               start: int = 0) -> None:
    """Copy into `target` the slice of `loaded` along `dim` that starts at `start` and is as long as target's `dim`
    (all of it when `dim` is None), after checking that the checkpoint tensor has the `full_shape` the config
    implies. ValueError (the caller adds the tensor's name) on a mismatch."""
    if tuple(loaded.shape) != tuple(full_shape):
        raise ValueError(f"has shape {tuple(loaded.shape)}, the model expects {tuple(full_shape)}; the checkpoint "
                         f"does not match config.json")
    with torch.no_grad():
        target.copy_(materialize(loaded) if dim is None else narrow_or_slice(loaded, dim, start, target.shape[dim]))


def default_weight_loader(param: torch.Tensor, loaded: Loaded, shard_id: object = None) -> None:
    """For replicated parameters (norms, rotary-free vectors): the whole tensor, same shape on every rank."""
    copy_shard(param.data, loaded, tuple(param.shape))


def linear_apply(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ W^T + bias` of `layer`: through its quantization method when it has one, else dense."""
    method = layer.quant_method
    if method is None:
        return F.linear(x, layer.weight, bias)
    return method.apply(layer, x, bias)


def _param(shape: tuple[int, ...], loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape), requires_grad=False)
    p.weight_loader = loader
    return p


@dataclass(frozen=True)
class OutputSegment:
    """One checkpoint part of a column-parallel layer's output: `whole` rows in the checkpoint (all ranks), of
    which this rank holds `size` rows starting at row `start` of the part, at `offset` in its own output."""

    whole: int
    offset: int
    size: int
    start: int


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's rows (output features) split across ranks; the output stays sharded."""

    quant_kind = "linear"  # what a quantization method may take over (weavelm.core.quantization.layer_kind)
    quant_method = None  # a QuantizeMethodBase when a quantization config claims the layer

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallelGroup):
        super().__init__()
        self.tp, self.in_features = tp, in_features
        self.out_per_rank = tp.divide(out_features, "output features")
        self.weight = _param((self.out_per_rank, in_features), self.weight_loader)
        self.bias = _param((self.out_per_rank,), self.weight_loader) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_apply(self, x, self.bias)

    def output_segments(self) -> list[OutputSegment]:
        """The checkpoint parts of the output, in `shard_id` order (one for a plain column-parallel layer)."""
        n = self.out_per_rank
        return [OutputSegment(n * self.tp.world_size, 0, n, self.tp.rank * n)]

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: object = None) -> None:
        segments = self.output_segments()
        if shard_id is None:
            _load_fused(param, loaded, segments)
            return
        index = self.shard_index(shard_id)
        seg = segments[index]
        copy_shard(param.data.narrow(0, seg.offset, seg.size), loaded, (seg.whole, *param.shape[1:]), 0, seg.start)

    def shard_index(self, shard_id: object) -> int:
        """Which output segment a checkpoint part's `shard_id` names."""
        raise ValueError(f"is one tensor; {type(self).__name__} takes no shard_id (got {shard_id!r})")


def _load_fused(param: nn.Parameter, loaded: Loaded, segments: list[OutputSegment]) -> None:
    """A checkpoint tensor holding every part stacked (a fused `qkv_proj` / `gate_up_proj`): each part's rows for
    this rank go to their place in the rank's output."""
    whole = sum(s.whole for s in segments)
    if tuple(loaded.shape) != (whole, *param.shape[1:]):
        raise ValueError(f"has shape {tuple(loaded.shape)}, the model expects {(whole, *param.shape[1:])}; the "
                         f"checkpoint does not match config.json")
    base = 0
    with torch.no_grad():
        for seg in segments:
            param.data.narrow(0, seg.offset, seg.size).copy_(narrow_or_slice(loaded, 0, base + seg.start, seg.size))
            base += seg.whole


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Column-parallel outputs of several checkpoint tensors (`shard_id` = their index) stacked in one weight; each
    rank holds its share of every one, in order: gate/up gives `[gate_r | up_r]`. A fused checkpoint tensor
    (`[gate | up]`, `shard_id=None`) is split the same way."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, tp: TensorParallelGroup):
        self.sizes = [tp.divide(s, "output features") for s in output_sizes]
        super().__init__(in_features, sum(output_sizes), bias, tp)

    def output_segments(self) -> list[OutputSegment]:
        ws, rank = self.tp.world_size, self.tp.rank
        return [OutputSegment(n * ws, sum(self.sizes[:i]), n, rank * n) for i, n in enumerate(self.sizes)]

    def shard_index(self, shard_id: object) -> int:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.sizes):
            raise ValueError(f"names part {shard_id!r}; {type(self).__name__} has parts 0..{len(self.sizes) - 1}")
        return shard_id


class QKVParallelLinear(ColumnParallelLinear):
    """Fused Q/K/V projection split by heads; `shard_id` is "q", "k" or "v" (None: one fused checkpoint tensor).
    Per rank: `num_heads // tp` query heads and `max(1, num_kv_heads // tp)` KV heads (KV head
    `rank // (tp // num_kv_heads)` when replicated)."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 tp: TensorParallelGroup):
        self.head_dim, self.total_kv_heads = head_dim, num_kv_heads
        self.num_heads = tp.divide(num_heads, "num_attention_heads")
        if tp.world_size >= num_kv_heads:
            if tp.world_size % num_kv_heads:
                raise ValueError(f"the tensor-parallel size ({tp.world_size}) must be a multiple of "
                                 f"num_key_value_heads ({num_kv_heads}) when it exceeds it")
            self.num_kv_heads, self.kv_replicas = 1, tp.world_size // num_kv_heads
        else:
            self.num_kv_heads, self.kv_replicas = tp.divide(num_kv_heads, "num_key_value_heads"), 1
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        out = (self.q_size + 2 * self.kv_size) * tp.world_size
        super().__init__(hidden, out, bias, tp)

    def output_segments(self) -> list[OutputSegment]:
        rank, q, kv = self.tp.rank, self.q_size, self.kv_size
        kv_whole, kv_start = self.total_kv_heads * self.head_dim, (rank // self.kv_replicas) * kv
        return [OutputSegment(q * self.tp.world_size, 0, q, rank * q), OutputSegment(kv_whole, q, kv, kv_start),
                OutputSegment(kv_whole, q + kv, kv, kv_start)]

    def shard_index(self, shard_id: object) -> int:
        if shard_id not in ("q", "k", "v"):
            raise ValueError(f"names part {shard_id!r}; {type(self).__name__} loads parts 'q', 'k' and 'v'")
        return "qkv".index(shard_id)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's columns (input features) split across ranks: each rank takes its slice of x, and the
    partial products are summed over ranks. The bias is added by rank 0 only, inside the sum."""

    quant_kind = "linear"
    quant_method = None

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallelGroup):
        super().__init__()
        self.tp, self.out_features = tp, out_features
        self.in_per_rank = tp.divide(in_features, "input features")
        self.weight = _param((out_features, self.in_per_rank), self.weight_loader)
        self.bias = _param((out_features,), default_weight_loader) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return linear_apply(self, x, self.bias)
        return self.tp.all_reduce(linear_apply(self, x, self.bias if self.tp.is_first else None))

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: object = None) -> None:
        full = (param.shape[0], self.in_per_rank * self.tp.world_size)
        copy_shard(param.data, loaded, full, 1, self.tp.rank * self.in_per_rank)
