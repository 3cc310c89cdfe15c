"""LoRA wrappers around a built model's linear layers, sharing one per-step `LoRABatchState`.

A wrapper holds stacked weights for every device slot, `lora_a (slots, S*R, in)` and `lora_b (slots, out, S*R)`,
with one rank-R block per packed part (S = 3 for QKV, 2 for gate/up, else 1); B is block-diagonal across parts, so
one shrink and one expand serve the whole packed layer. Tensor parallelism shards them like the base layer:
column-parallel layers keep this rank's rows of B, row-parallel layers this rank's columns of A (the partial
deltas are summed by the layer's all-reduce, with the base output). The vocabulary-parallel embedding and head keep
whole (replicated) LoRA weights and add their delta after the base layer's collective.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from weavelm.lora.ops import group_by_slot, lora_grouped_torch


def use_triton(x: torch.Tensor) -> bool:
    """Whether `x` goes through the Triton kernels (CUDA tensors; tests route CPU tensors through the interpreter)."""
    return x.is_cuda


class LoRAIndex:
    """Per-token adapter slots of one kind of call (tokens of the forward, or rows given to the head): a static
    `slots` buffer (-1: base model) plus its grouping, refreshed in place each step (CUDA-graph safe)."""

    def __init__(self, size: int, num_slots: int, device: torch.device):
        self.num_slots = num_slots
        self.slots = torch.full((size,), -1, dtype=torch.int32, device=device)
        self.order, self.counts, self.starts = group_by_slot(self.slots, num_slots)
        self.groups: list[tuple[int, torch.Tensor]] = []  # host-side (slot, rows) for the CPU path
        self.any_active = False
        self._pin = device.type == "cuda"

    def set(self, slots: np.ndarray) -> None:
        n = len(slots)
        self.any_active = bool((slots >= 0).any())
        if not self.any_active:  # nothing reads the index this step: no kernel runs, no graph with them replays
            self.groups = []
            return
        if self.slots.device.type == "cpu":
            self.groups = [(int(s), torch.from_numpy(np.nonzero(slots == s)[0])) for s in np.unique(slots) if s >= 0]
            if not use_triton(self.slots):
                return
        # fresh pinned memory from torch's caching host allocator, which keeps it until the copy has run: with
        # async scheduling the next step is prepared while this one's copy may still be queued
        staged = torch.from_numpy(slots.astype(np.int32, copy=False))
        if self._pin:
            staged = staged.pin_memory()
        self.slots[:n].copy_(staged, non_blocking=True)
        self.slots[n:].fill_(-1)
        order, counts, starts = group_by_slot(self.slots, self.num_slots)
        self.order.copy_(order)
        self.counts.copy_(counts)
        self.starts.copy_(starts)

    @property
    def index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.order, self.counts, self.starts


class LoRABatchState:
    """What every wrapped layer reads in a forward: the token index, and the head's row index."""

    def __init__(self, num_slots: int, max_tokens: int, device: torch.device):
        self.tokens = LoRAIndex(max_tokens, num_slots, device)
        self.head = LoRAIndex(max_tokens, num_slots, device)
        # Set while the decode CUDA graphs that steps with adapters replay are captured (with no adapter active):
        # they must contain the kernels, which exit at once for rows without one. Steps without any adapter run
        # eagerly without the kernels, or replay graphs captured without them (cuda_graphs.DecodeGraphs).
        self.force_kernels = False

    @property
    def any_active(self) -> bool:
        """Whether a row of this step's forward or head has an adapter (host-side, set by `LoRAIndex.set`)."""
        return self.tokens.any_active or self.head.any_active

    def _launch(self, index: LoRAIndex) -> bool:
        return index.any_active or self.force_kernels

    def apply(self, x: torch.Tensor, y: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
              head: bool = False) -> torch.Tensor:
        index = self.head if head else self.tokens
        if not self._launch(index):
            return y
        if not use_triton(x):
            return lora_grouped_torch(x, y, index.groups, lora_a, lora_b)
        from weavelm.lora.triton_ops import lora_expand, lora_shrink
        return lora_expand(lora_shrink(x, lora_a, index.index), lora_b, y, index.index)

    def apply_embedding(self, ids: torch.Tensor, y: torch.Tensor, lora_a_t: torch.Tensor,
                        lora_b: torch.Tensor) -> torch.Tensor:
        """Embedding delta: row `ids[t]` of A^T (stored as `lora_a_t (slots, vocab, R)`) times B^T."""
        index = self.tokens
        if not self._launch(index):
            return y
        if not use_triton(ids):
            y = y.clone()
            for slot, rows in index.groups:
                y.index_add_(0, rows, lora_a_t[slot, ids.index_select(0, rows)] @ lora_b[slot].T)
            return y
        from weavelm.lora.triton_ops import lora_expand
        slots = index.slots[: ids.shape[0]].long()
        h = lora_a_t[slots.clamp(min=0), ids].float()
        return lora_expand(h, lora_b, y, index.index)


class LoRALinear(nn.Module):
    """A column- or row-parallel linear layer plus its adapters. `parts[i] = (module name, output offset on this
    rank, output rows on this rank, first row of this rank's shard in the whole part)`."""

    def __init__(self, base: nn.Module, parts: list[tuple[str, int, int, int]], state: LoRABatchState,
                 num_slots: int, max_rank: int, row_parallel: bool):
        super().__init__()
        self.base, self.parts, self.state, self.row_parallel = base, parts, state, row_parallel
        self.max_rank = max_rank
        out_f, in_f = base.weight.shape
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.register_buffer("lora_a", torch.zeros(num_slots, len(parts) * max_rank, in_f, **kw), persistent=False)
        self.register_buffer("lora_b", torch.zeros(num_slots, out_f, len(parts) * max_rank, **kw), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        if not self.row_parallel:
            return self.state.apply(x, base(x), self.lora_a, self.lora_b)
        tp = base.tp
        y = F.linear(x, base.weight, base.bias if tp.world_size == 1 or tp.is_first else None)
        y = self.state.apply(x, y, self.lora_a, self.lora_b)
        return y if tp.world_size == 1 else tp.all_reduce(y)

    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()

    def set_part(self, slot: int, module: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Write one part's whole-model A (r, in) and scaled B (out, r) into `slot`, taking this rank's shard."""
        i = next(i for i, p in enumerate(self.parts) if p[0] == module)
        _, offset, size, start = self.parts[i]
        r, col = a.shape[0], i * self.max_rank
        if self.row_parallel:
            per = self.base.in_per_rank
            a = a[:, self.base.tp.rank * per:(self.base.tp.rank + 1) * per]
        else:
            b = b[start:start + size]
        self.lora_a[slot, col:col + r].copy_(a)
        self.lora_b[slot, offset:offset + size, col:col + r].copy_(b)


class LoRAEmbedding(nn.Module):
    """The token embedding plus adapters (whole vocabulary on every rank); `compute_logits` is the base's (a tied
    head carries no adapter of its own)."""

    def __init__(self, base: nn.Module, state: LoRABatchState, num_slots: int, max_rank: int):
        super().__init__()
        self.base, self.state = base, state
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.register_buffer("lora_a_t", torch.zeros(num_slots, base.num_embeddings, max_rank, **kw),
                             persistent=False)
        self.register_buffer("lora_b", torch.zeros(num_slots, base.embedding_dim, max_rank, **kw), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.state.apply_embedding(input_ids, self.base(input_ids), self.lora_a_t, self.lora_b)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.base.compute_logits(hidden_states)

    def clear_slot(self, slot: int) -> None:
        self.lora_a_t[slot].zero_()
        self.lora_b[slot].zero_()

    def set_part(self, slot: int, module: str, a: torch.Tensor, b: torch.Tensor) -> None:
        r = a.shape[0]
        self.lora_a_t[slot, :, :r].copy_(a.T)
        self.lora_b[slot, :, :r].copy_(b)


class LoRALMHead(nn.Module):
    """The untied LM head plus adapters (whole vocabulary on every rank), added to the gathered logits of the rows
    the runner named with `LoRABatchState.head`."""

    def __init__(self, base: nn.Module, state: LoRABatchState, num_slots: int, max_rank: int):
        super().__init__()
        self.base, self.state = base, state
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.register_buffer("lora_a", torch.zeros(num_slots, max_rank, base.embedding_dim, **kw), persistent=False)
        self.register_buffer("lora_b", torch.zeros(num_slots, base.num_embeddings, max_rank, **kw), persistent=False)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.base.compute_logits(hidden_states)
        return self.state.apply(hidden_states, logits, self.lora_a, self.lora_b, head=True)

    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()

    def set_part(self, slot: int, module: str, a: torch.Tensor, b: torch.Tensor) -> None:
        r = a.shape[0]
        self.lora_a[slot, :r].copy_(a)
        self.lora_b[slot, :, :r].copy_(b)
