"""LoRA layers: each wraps one `weavelm.layers` layer, found by type (`can_replace_layer`, as vLLM's do).

A wrapper holds stacked weights for every device slot, `lora_a (slots, S*R, in)` and `lora_b (slots, out, S*R)`,
with one rank-R block per checkpoint part of a packed layer (S = its `output_segments()`: 3 for QKV, 2 for gate/up,
else 1); B is block-diagonal across parts, so one shrink and one expand serve the whole packed layer. An adapter
made for a fused checkpoint module (Phi-3's `qkv_proj`) fills block 0 with its one A and every part's rows of B.
Tensor parallelism shards them like the base layer: column-parallel layers keep this rank's rows of B (per part),
row-parallel layers this rank's columns of A (the partial deltas are summed by the layer's all-reduce, with the
base output). The vocabulary-parallel embedding and head keep whole (replicated) LoRA weights and add their delta
after the base layer's collective.

Shapes are whole-model (before sharding): `part_shapes()` lists `(in_features, out_features)` per part, what a
PEFT adapter's A `(r, in)` and B `(out, r)` must match.
"""

from __future__ import annotations

import torch
from torch import nn

from weavelm.layers import (ColumnParallelLinear, MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear,
                            RowParallelLinear, VocabParallelEmbedding, linear_apply)
from weavelm.lora.batch import LoRABatchState


class BaseLayerWithLoRA(nn.Module):
    """A base layer plus adapter slots. Subclasses name the one layer class they replace (`base_type`)."""

    base_type: type[nn.Module] = nn.Module
    embedding = False  # whether adapters name it with `lora_embedding_A/B` (PEFT's embedding layout)

    def __init__(self, base: nn.Module, state: LoRABatchState, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.base, self.state, self.max_rank = base, state, max_rank
        self.kw = dict(dtype=dtype, device=device)

    @classmethod
    def can_replace_layer(cls, source_layer: nn.Module) -> bool:
        """Whether this class wraps `source_layer`: exactly its `base_type` (a subclass is another layer)."""
        return type(source_layer) is cls.base_type

    def part_shapes(self) -> list[tuple[int, int]]:
        """Whole-model `(in_features, out_features)` of each checkpoint part, in shard order."""
        raise NotImplementedError

    def clear_slot(self, slot: int) -> None:
        for buf in self.buffers(recurse=False):
            buf[slot].zero_()

    def set_lora(self, slot: int, part: int | None, a: torch.Tensor, b: torch.Tensor) -> None:
        """Write whole-model A (r, in) and pre-scaled B (out, r) of `part` (None: all parts at once, the fused
        checkpoint module) into `slot`, keeping this rank's shard."""
        raise NotImplementedError


class ColumnParallelLinearWithLoRA(BaseLayerWithLoRA):
    base_type = ColumnParallelLinear

    def __init__(self, base, state, num_slots, max_rank, dtype, device):
        super().__init__(base, state, num_slots, max_rank, dtype, device)
        self.segments = base.output_segments()
        s, out = len(self.segments), sum(seg.size for seg in self.segments)
        self.register_buffer("lora_a", torch.zeros(num_slots, s * max_rank, base.in_features, **self.kw),
                             persistent=False)
        self.register_buffer("lora_b", torch.zeros(num_slots, out, s * max_rank, **self.kw), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.state.apply(x, self.base(x), self.lora_a, self.lora_b)

    def part_shapes(self) -> list[tuple[int, int]]:
        return [(self.base.in_features, seg.whole) for seg in self.segments]

    def set_lora(self, slot: int, part: int | None, a: torch.Tensor, b: torch.Tensor) -> None:
        r = a.shape[0]
        if part is None:  # one adapter over the fused output: block 0, B split into the parts' rows
            self.lora_a[slot, :r].copy_(a)
            for seg, rows in zip(self.segments, b.split([seg.whole for seg in self.segments])):
                self.lora_b[slot, seg.offset:seg.offset + seg.size, :r].copy_(rows[seg.start:seg.start + seg.size])
            return
        seg, col = self.segments[part], part * self.max_rank
        self.lora_a[slot, col:col + r].copy_(a)
        self.lora_b[slot, seg.offset:seg.offset + seg.size, col:col + r].copy_(b[seg.start:seg.start + seg.size])


class MergedColumnParallelLinearWithLoRA(ColumnParallelLinearWithLoRA):
    base_type = MergedColumnParallelLinear


class QKVParallelLinearWithLoRA(ColumnParallelLinearWithLoRA):
    base_type = QKVParallelLinear


class RowParallelLinearWithLoRA(BaseLayerWithLoRA):
    base_type = RowParallelLinear

    def __init__(self, base, state, num_slots, max_rank, dtype, device):
        super().__init__(base, state, num_slots, max_rank, dtype, device)
        self.out_features = base.out_features
        self.register_buffer("lora_a", torch.zeros(num_slots, max_rank, base.in_per_rank, **self.kw),
                             persistent=False)
        self.register_buffer("lora_b", torch.zeros(num_slots, self.out_features, max_rank, **self.kw),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base, tp = self.base, self.base.tp
        y = linear_apply(base, x, base.bias if tp.is_first else None)
        y = self.state.apply(x, y, self.lora_a, self.lora_b)
        return y if tp.world_size == 1 else tp.all_reduce(y)

    def part_shapes(self) -> list[tuple[int, int]]:
        return [(self.base.in_per_rank * self.base.tp.world_size, self.out_features)]

    def set_lora(self, slot: int, part: int | None, a: torch.Tensor, b: torch.Tensor) -> None:
        r, per, rank = a.shape[0], self.base.in_per_rank, self.base.tp.rank
        self.lora_a[slot, :r].copy_(a[:, rank * per:(rank + 1) * per])
        self.lora_b[slot, :, :r].copy_(b)


class VocabParallelEmbeddingWithLoRA(BaseLayerWithLoRA):
    """The token embedding plus adapters (whole vocabulary on every rank); `compute_logits` is the base's (a tied
    head carries no adapter of its own)."""

    base_type = VocabParallelEmbedding
    embedding = True

    def __init__(self, base, state, num_slots, max_rank, dtype, device):
        super().__init__(base, state, num_slots, max_rank, dtype, device)
        self.register_buffer("lora_a_t", torch.zeros(num_slots, base.num_embeddings, max_rank, **self.kw),
                             persistent=False)
        self.register_buffer("lora_b", torch.zeros(num_slots, base.embedding_dim, max_rank, **self.kw),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.state.apply_embedding(input_ids, self.base(input_ids), self.lora_a_t, self.lora_b)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.base.compute_logits(hidden_states)

    def part_shapes(self) -> list[tuple[int, int]]:
        return [(self.base.num_embeddings, self.base.embedding_dim)]

    def set_lora(self, slot: int, part: int | None, a: torch.Tensor, b: torch.Tensor) -> None:
        r = a.shape[0]
        self.lora_a_t[slot, :, :r].copy_(a.T)
        self.lora_b[slot, :, :r].copy_(b)


class ParallelLMHeadWithLoRA(BaseLayerWithLoRA):
    """The untied LM head plus adapters (whole vocabulary on every rank), added to the gathered logits of the rows
    the runner named with `LoRABatchState.head`."""

    base_type = ParallelLMHead

    def __init__(self, base, state, num_slots, max_rank, dtype, device):
        super().__init__(base, state, num_slots, max_rank, dtype, device)
        self.register_buffer("lora_a", torch.zeros(num_slots, max_rank, base.embedding_dim, **self.kw),
                             persistent=False)
        self.register_buffer("lora_b", torch.zeros(num_slots, base.num_embeddings, max_rank, **self.kw),
                             persistent=False)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.base.compute_logits(hidden_states)
        return self.state.apply(hidden_states, logits, self.lora_a, self.lora_b, head=True)

    def part_shapes(self) -> list[tuple[int, int]]:
        return [(self.base.embedding_dim, self.base.num_embeddings)]

    def set_lora(self, slot: int, part: int | None, a: torch.Tensor, b: torch.Tensor) -> None:
        r = a.shape[0]
        self.lora_a[slot, :r].copy_(a)
        self.lora_b[slot, :, :r].copy_(b)


LORA_LAYER_CLASSES: tuple[type[BaseLayerWithLoRA], ...] = (
    ColumnParallelLinearWithLoRA, MergedColumnParallelLinearWithLoRA, QKVParallelLinearWithLoRA,
    RowParallelLinearWithLoRA, VocabParallelEmbeddingWithLoRA, ParallelLMHeadWithLoRA)
"""Every LoRA layer, asked in turn for each module of a model (`weavelm.lora.model.wrap_model`)."""
