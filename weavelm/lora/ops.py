"""Batched LoRA: `y += (x A_s^T) B_s^T` for each token with its own adapter slot `s` (-1: base model, no change).

Stacked weights, one row per device slot: `A (num_slots, R, in)`, `B (num_slots, out, R)` with B pre-scaled and
zero beyond an adapter's rank. Three ways to compute the same thing:

- `lora_reference`: the readable definition, a per-token gather of A and B (memory grows with tokens x weights;
  for tests).
- `lora_grouped_torch`: the CPU path, one matmul pair per adapter present in the batch (host-side groups).
- `triton_ops.lora_shrink` / `lora_expand`: the device path, Punica's SGMV idea: tokens sorted by slot, one
  program per (token tile, output tile, slot) that exits when its slot has no tokens there; reads only static
  buffers, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch


def lora_reference(x: torch.Tensor, slots: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """The delta `(T, out)` in fp32. x: (T, in); slots: (T,) int, -1 = none; lora_a: (L, R, in); lora_b: (L, out, R)."""
    valid = (slots >= 0).unsqueeze(-1)
    idx = slots.long().clamp(min=0)
    shrunk = torch.einsum("tk,trk->tr", x.float(), lora_a[idx].float())
    return torch.einsum("tr,tor->to", shrunk, lora_b[idx].float()) * valid


def lora_grouped_torch(x: torch.Tensor, y: torch.Tensor, groups: list[tuple[int, torch.Tensor]],
                       lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """`y` plus the delta, computed per adapter: `groups` lists (slot, row indices) of the adapters present."""
    if not groups:
        return y
    y = y.clone()
    for slot, rows in groups:
        xs = x.index_select(0, rows)
        y.index_add_(0, rows, (xs @ lora_a[slot].T) @ lora_b[slot].T)
    return y


def group_by_slot(slots: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """On the device, no host sync: (token positions sorted by slot, tokens per slot (L,), first position of each
    slot's run (L,)), all int32. Tokens with slot -1 sort last and belong to no slot."""
    key = torch.where(slots < 0, num_slots, slots.long())
    order = torch.argsort(key, stable=True).to(torch.int32)
    counts = torch.bincount(key, minlength=num_slots + 1)[:num_slots].to(torch.int32)
    starts = (torch.cumsum(counts, 0) - counts).to(torch.int32)
    return order, counts, starts
