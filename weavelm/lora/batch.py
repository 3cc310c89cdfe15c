"""The per-step adapter index every LoRA layer reads (`LoRABatchState`), and the batched delta it computes.

The manager writes, before each forward, which device slot each token (and each row given to the LM head) uses;
the wrapped layers (`weavelm.lora.layers`) add `x A_s^T B_s^T` for their tokens through `apply`.
"""

from __future__ import annotations

import numpy as np
import torch

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
