"""Verification of draft tokens: the target's per-position distributions and the rejection sampler.

Rule (Leviathan et al. 2023, as vLLM applies it): draft token d at a position is accepted with probability
min(1, p(d) / q(d)), where p is the target's distribution there (after temperature, top-k, top-p, min-p) and q the
draft's (a point mass for deterministic proposers, so the test is u < p(d)). At the first rejection the token is
drawn from norm(max(p - q, 0)) and the run ends; when every draft is accepted a bonus token is drawn from the
target's distribution at the next position. The emitted tokens are then distributed exactly as the target would
sample them one by one. A greedy row's p is the one-hot argmax, so drafts are accepted while they equal the
target's argmax and the first mismatch is replaced by it: the output is the target's greedy output.
"""

from __future__ import annotations

import numpy as np
import torch

from weavelm.sample.sampler import SamplingMetadata, apply_logits_processors, apply_top_k_top_p_min_p


def target_probs(logits: torch.Tensor, m: SamplingMetadata) -> torch.Tensor:
    """(T, vocab) float32 distributions the target samples from at each row: the same processing as `sample`
    (processors, temperature, top-k / top-p / min-p); greedy rows are one-hot at the argmax."""
    logits = apply_logits_processors(logits, m)
    greedy_ids = logits.argmax(dim=-1)
    one_hot = torch.zeros_like(logits).scatter_(-1, greedy_ids[:, None], 1.0)
    if m.all_greedy:
        return one_hot
    temp = torch.where(m.temperature > 0, m.temperature, torch.ones_like(m.temperature))
    probs = apply_top_k_top_p_min_p(logits / temp[:, None], m).softmax(dim=-1)
    return torch.where((m.temperature > 0)[:, None], probs, one_hot)


def rejection_sample(probs: torch.Tensor, draft_token_ids: torch.Tensor, draft_probs: torch.Tensor | None,
                     num_drafts: list[int], generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Verify the drafts of R requests and return their emitted tokens, (R, max(num_drafts) + 1) int64 padded
    with -1: each row is its accepted drafts followed by one token from the target (recovered or bonus).

    probs: (sum(num_drafts) + R, vocab), request i's rows are its positions 0..num_drafts[i] in order.
    draft_token_ids: (sum(num_drafts),) int64, request i's drafts in order. draft_probs: (sum(num_drafts), vocab)
    the distribution each draft was drawn from, or None for point masses. generators: request index -> its
    torch.Generator (seeded requests draw all their randomness from it, in a fixed order: the acceptance uniforms,
    then the exponential noise of their recovered and bonus rows), so they are reproducible.
    """
    device, vocab = probs.device, probs.shape[-1]
    num_reqs = len(num_drafts)
    counts = np.asarray(num_drafts, dtype=np.int64)
    total = int(counts.sum())
    max_k = int(counts.max()) if num_reqs else 0
    row_start = np.zeros(num_reqs, dtype=np.int64)
    row_start[1:] = np.cumsum(counts + 1)[:-1]
    draft_req = np.repeat(np.arange(num_reqs), counts)
    draft_pos = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    draft_rows = torch.from_numpy(row_start[draft_req] + draft_pos).to(device)
    bonus_rows = torch.from_numpy(row_start + counts).to(device)

    p_draft = probs[draft_rows]  # (D, vocab) target distribution at each draft's position
    if draft_probs is None:
        q = torch.zeros_like(p_draft).scatter_(-1, draft_token_ids[:, None], 1.0)
    else:
        q = draft_probs
    p_tok = p_draft.gather(-1, draft_token_ids[:, None]).squeeze(-1)
    q_tok = q.gather(-1, draft_token_ids[:, None]).squeeze(-1)

    uniform = torch.rand(total, device=device)
    noise = torch.empty(total + num_reqs, vocab, device=device).exponential_()
    _seeded_draws(uniform, noise, counts, generators, total)
    accepted = uniform * q_tok < p_tok

    residual = (p_draft - q).clamp_(min=0)
    empty = residual.sum(-1, keepdim=True) <= 0  # p == q there: a rejection has probability 0; keep p
    residual = torch.where(empty, p_draft, residual)
    candidates = torch.cat([residual, probs[bonus_rows]]) / noise
    sampled = candidates.argmax(dim=-1)  # exponential race: a draw from each (unnormalised) distribution
    recovered, bonus = sampled[:total], sampled[total:]

    draft_req_t = torch.from_numpy(draft_req).to(device)
    draft_pos_t = torch.from_numpy(draft_pos).to(device)
    acc_pad = torch.zeros(num_reqs, max_k, dtype=torch.int64, device=device)
    acc_pad[draft_req_t, draft_pos_t] = accepted.long()
    num_accepted = acc_pad.cumprod(dim=1).sum(dim=1)  # leading accepts
    out = torch.full((num_reqs, max_k + 1), -1, dtype=torch.int64, device=device)
    keep = draft_pos_t < num_accepted[draft_req_t]
    out[draft_req_t[keep], draft_pos_t[keep]] = draft_token_ids[keep]
    rec_pad = torch.zeros(num_reqs, max_k + 1, dtype=torch.int64, device=device)
    rec_pad[draft_req_t, draft_pos_t] = recovered
    counts_t = torch.from_numpy(counts).to(device)
    final = torch.where(num_accepted < counts_t, rec_pad.gather(1, num_accepted[:, None]).squeeze(1), bonus)
    out.scatter_(1, num_accepted[:, None], final[:, None])
    return out


def _seeded_draws(uniform: torch.Tensor, noise: torch.Tensor, counts: np.ndarray,
                  generators: dict[int, torch.Generator], total: int) -> None:
    if not generators:
        return
    starts = np.cumsum(counts) - counts
    for i, gen in generators.items():
        s, n = int(starts[i]), int(counts[i])
        if n:
            uniform[s:s + n] = torch.rand(n, device=uniform.device, generator=gen)
            noise[s:s + n].exponential_(generator=gen)
        noise[total + i].exponential_(generator=gen)


def emitted_lists(out: np.ndarray) -> list[list[int]]:
    """Rows of `rejection_sample`'s output (on the host) as token lists, padding dropped."""
    return [row[row >= 0].tolist() for row in out]
