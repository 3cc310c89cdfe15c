"""Tensor-parallel linear and vocabulary layers (vLLM's shapes), each holding only its rank's shard.

Every parameter carries `weight_loader(param, loaded, shard_id=None)`, which checks the FULL checkpoint tensor's
shape and copies in only this rank's slice; `loaded` is a tensor or a `LazyTensor`, so only the shard is read.

- `ColumnParallelLinear`: output features split across ranks (weight rows); no communication.
- `MergedColumnParallelLinear`: several column-parallel outputs in one matmul (gate/up), each split across ranks.
- `QKVParallelLinear`: fused Q/K/V split by heads. With fewer KV heads than ranks each rank holds one KV head,
  replicated on `world_size // num_kv_heads` ranks (vLLM's rule), so a rank's query heads always find theirs.
- `RowParallelLinear`: input features split (weight columns); partial outputs are summed with an all-reduce, the
  bias added once (by rank 0 before the sum).
- `VocabParallelEmbedding`: vocabulary rows split; ids outside the shard give zeros, then an all-reduce.
- `ParallelLMHead`: vocabulary rows split; `compute_logits` all-gathers the shards to full-vocabulary logits. A
  tied head is the embedding itself (same shard).

On one rank every layer is a plain `F.linear` / `F.embedding` over the full weight: no collective, no extra copy.

Quantization (`weavelm.core.quantization`): a layer's matmul goes through `linear_apply`, which runs
`layer.quant_method.apply(layer, x, bias)` when a quantization config attached a method to the layer (its weight is
then the method's pack, and `layer.weight` may be None), else `F.linear` on the dense weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weavelm.core.model_files import LazyTensor, materialize, narrow_or_slice
from weavelm.distributed import TensorParallelGroup
from weavelm.utils import cdiv

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

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: object = None) -> None:
        full = (self.out_per_rank * self.tp.world_size, *param.shape[1:])
        copy_shard(param.data, loaded, full, 0, self.tp.rank * self.out_per_rank)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Column-parallel outputs of several checkpoint tensors (`shard_id` = their index) stacked in one weight; each
    rank holds its share of every one, in order: gate/up gives `[gate_r | up_r]`."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, tp: TensorParallelGroup):
        self.sizes = [tp.divide(s, "output features") for s in output_sizes]
        super().__init__(in_features, sum(output_sizes), bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: object = None) -> None:
        if not isinstance(shard_id, int):
            raise ValueError(f"is a fused tensor; {type(self).__name__} loads its parts one at a time")
        size = self.sizes[shard_id]
        target = param.data.narrow(0, sum(self.sizes[:shard_id]), size)
        copy_shard(target, loaded, (size * self.tp.world_size, *param.shape[1:]), 0, self.tp.rank * size)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused Q/K/V projection split by heads; `shard_id` is "q", "k" or "v". Per rank: `num_heads // tp` query
    heads and `max(1, num_kv_heads // tp)` KV heads (KV head `rank // (tp // num_kv_heads)` when replicated)."""

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

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: object = None) -> None:
        rank = self.tp.rank
        if shard_id == "q":
            offset, size, start, rows = 0, self.q_size, rank * self.q_size, self.q_size * self.tp.world_size
        elif shard_id in ("k", "v"):
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            size, start = self.kv_size, (rank // self.kv_replicas) * self.kv_size
            rows = self.total_kv_heads * self.head_dim
        else:
            raise ValueError(f"is a fused tensor; {type(self).__name__} loads q, k and v one at a time")
        copy_shard(param.data.narrow(0, offset, size), loaded, (rows, *param.shape[1:]), 0, start)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's columns (input features) split across ranks: each rank takes its slice of x, and the
    partial products are summed over ranks. The bias is added by rank 0 only, inside the sum."""

    quant_kind = "linear"
    quant_method = None

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallelGroup):
        super().__init__()
        self.tp = tp
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


class VocabParallelEmbedding(nn.Module):
    """Embedding whose vocabulary rows are split across ranks: rank r holds ids `[r * per_rank, (r + 1) * per_rank)`
    (the last shard zero-padded when the vocabulary does not divide). `forward` looks up the ids it holds, zeros
    the others, and sums over ranks. A quantization method, when attached, runs `compute_logits`' matmul (the
    lookup keeps the dense rows)."""

    quant_kind = "embedding"
    quant_method = None

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TensorParallelGroup):
        super().__init__()
        self.tp, self.num_embeddings, self.embedding_dim = tp, num_embeddings, embedding_dim
        self.per_rank = cdiv(num_embeddings, tp.world_size)
        self.vocab_start = tp.rank * self.per_rank
        self.vocab_end = min(self.vocab_start + self.per_rank, num_embeddings)
        self.weight = _param((self.per_rank, embedding_dim), self.weight_loader)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)
        held = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        out = F.embedding(torch.where(held, input_ids - self.vocab_start, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill_(~held.unsqueeze(-1), 0))

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: object = None) -> None:
        rows = self.vocab_end - self.vocab_start
        if rows < self.per_rank:
            param.data[rows:].zero_()
        copy_shard(param.data[:rows], loaded, (self.num_embeddings, self.embedding_dim), 0, self.vocab_start)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(tokens, hidden) -> (tokens, num_embeddings) logits against these rows (the tied or untied head)."""
        logits = linear_apply(self, hidden_states, None)
        if self.tp.world_size == 1:
            return logits
        return self.tp.all_gather(logits, dim=-1)[..., :self.num_embeddings]


class ParallelLMHead(VocabParallelEmbedding):
    """The untied output projection: vocabulary-sharded like the embedding; only `compute_logits` is used."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is applied with compute_logits, not called")
