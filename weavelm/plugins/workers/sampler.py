"""Sampling on the device: greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

The only host transfer is the sampled ids (and their logprobs when asked for). A seeded request draws its noise
from its own generator, so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingMetadata:
    """Per sampled row: (n,) tensors on the logits' device; `generators` maps row -> torch.Generator."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    generators: dict[int, torch.Generator]
    want_logprobs: bool


def apply_top_k_top_p_min_p(logits: torch.Tensor, m: SamplingMetadata) -> torch.Tensor:
    """Mask logits outside each row's top-k / nucleus / min-p set with -inf (always keeps the argmax)."""
    if not (m.any_top_k or m.any_top_p or m.any_min_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if m.any_top_k:
        k = torch.where(m.top_k > 0, m.top_k, vocab).clamp(max=vocab)
        mask |= torch.arange(vocab, device=logits.device)[None, :] >= k[:, None]
    probs = sorted_logits.softmax(dim=-1)
    if m.any_top_p:
        cum = probs.cumsum(dim=-1)
        mask |= (cum - probs) > m.top_p[:, None]
    if m.any_min_p:
        mask |= probs < (m.min_p[:, None] * probs[:, :1])
    mask[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, m: SamplingMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits: (n, vocab) float32. Returns sampled ids (n,) int64 and, if asked, their logprobs (n,)
    under the model's unmodified distribution."""
    logprobs = logits.log_softmax(dim=-1) if m.want_logprobs else None
    greedy = logits.argmax(dim=-1)
    if m.all_greedy:
        ids = greedy
    else:
        temp = torch.where(m.temperature > 0, m.temperature, torch.ones_like(m.temperature))
        scaled = apply_top_k_top_p_min_p(logits / temp[:, None], m)
        probs = scaled.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for row, gen in m.generators.items():
            noise[row].exponential_(generator=gen)
        ids = torch.where(m.temperature > 0, (probs / noise).argmax(dim=-1), greedy)
    lp = logprobs.gather(-1, ids[:, None]).squeeze(-1) if logprobs is not None else None
    return ids, lp
