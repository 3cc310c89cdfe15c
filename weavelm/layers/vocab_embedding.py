"""The vocabulary-parallel embedding and LM head.

- `VocabParallelEmbedding`: vocabulary rows split; ids outside the shard give zeros, then an all-reduce.
- `ParallelLMHead`: vocabulary rows split; `compute_logits` all-gathers the shards to full-vocabulary logits. A
  tied head is the embedding itself (same shard).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weavelm.distributed import TensorParallelGroup
from weavelm.layers.linear import Loaded, _param, copy_shard, linear_apply
from weavelm.utils import cdiv


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
