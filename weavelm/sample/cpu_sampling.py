"""Temperature sampling on the CPU by inverse CDF, with one uniform number per row.

The device path's exponential race draws one random number per vocabulary entry; on a CPU that costs ~1 ms per row
of a 49k vocabulary (more than the rest of sampling), and the full sort behind top-k / top-p another ~2-4 ms. Here:

- Without filters a row is sampled in two levels: the probability mass of each bucket of 256 tokens, a draw among
  the buckets by their cumulative mass, then among the tokens of the chosen bucket. Exact, and O(vocab) without a
  sort or a per-token random number.
- With top-k / top-p / min-p the kept set is always a prefix of the tokens sorted by probability, so it is found
  among the row's `CANDIDATES` most likely tokens (`topk`, a partial sort) whenever it ends inside them; a row whose
  set may reach past them (a flat distribution with a large top-p) takes the full sort of `sampler`.
- Each seeded row draws its uniform number from its own generator, so its tokens depend on nothing else in the
  batch. The kept sets are exactly those of `sampler.apply_top_k_top_p_min_p`.
"""

from __future__ import annotations

import torch

from weavelm.sample.sampler import SamplingMetadata, apply_top_k_top_p_min_p

BUCKET = 256
CANDIDATES = 512


def _uniforms(rows: list[int], m: SamplingMetadata) -> torch.Tensor:
    """(len(rows), 1) float64 uniforms in [0, 1): a seeded row's from its own generator."""
    u = torch.rand(len(rows), 1, dtype=torch.float64)
    for i, row in enumerate(rows):
        gen = m.generators.get(row)
        if gen is not None:
            u[i] = torch.rand(1, dtype=torch.float64, generator=gen)
    return u


def _draw(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(n, W) non-negative weights and (n, 1) uniforms -> (n, 1) indices drawn in proportion to the weights."""
    cum = weights.cumsum(-1)
    return torch.searchsorted(cum, u * cum[:, -1:], right=True).clamp_(max=weights.shape[1] - 1)


def _two_level(logits: torch.Tensor, top: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Rows of logits (n, V), their maxima (n, 1) and temperatures (n,) -> (n,) ids drawn from softmax(logits / T)."""
    n, vocab = logits.shape
    p = (logits - top).div_(temperature[:, None]).exp_()
    pad = (-vocab) % BUCKET
    if pad:
        p = torch.nn.functional.pad(p, (0, pad))
    buckets = p.view(n, -1, BUCKET)
    mass = buckets.sum(-1, dtype=torch.float64)
    cum = mass.cumsum(-1)
    target = u * cum[:, -1:]
    b = torch.searchsorted(cum, target, right=True).clamp_(max=cum.shape[1] - 1)
    below = cum.gather(1, b) - mass.gather(1, b)
    inner = buckets[torch.arange(n), b[:, 0]].double().cumsum(-1)
    j = torch.searchsorted(inner, target - below, right=True).clamp_(max=BUCKET - 1)
    ids = (b * BUCKET + j)[:, 0]
    return torch.minimum(ids, torch.full_like(ids, vocab - 1))


def _filtered(scaled: torch.Tensor, m: SamplingMetadata, rows: torch.Tensor, u: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample rows under top-k / top-p / min-p among their most likely tokens. Returns (ids, complete): rows whose
    kept set may extend past the candidates are not complete (their ids are meaningless)."""
    n, vocab = scaled.shape
    k = min(CANDIDATES, vocab)
    top, idx = scaled.topk(k, dim=-1)  # sorted, descending
    probs = (top - scaled.logsumexp(-1, keepdim=True)).exp().double()
    pos = torch.arange(k)[None, :]
    keep = torch.ones_like(probs, dtype=torch.bool)
    complete = torch.full((n,), k == vocab)
    if m.any_top_k:
        top_k = m.top_k[rows]
        keep &= (top_k[:, None] <= 0) | (pos < top_k[:, None])
        complete |= (top_k > 0) & (top_k <= k)
    if m.any_top_p:
        top_p = m.top_p[rows].double()
        cum = probs.cumsum(-1)
        cut = (cum - probs) > top_p[:, None]
        keep &= ~cut
        complete |= cut.any(-1)
    if m.any_min_p:
        low = probs < (m.min_p[rows].double()[:, None] * probs[:, :1])
        keep &= ~low
        complete |= low.any(-1)
    keep[:, 0] = True
    return idx.gather(1, _draw(probs * keep, u))[:, 0], complete


def sample_cpu(logits: torch.Tensor, m: SamplingMetadata) -> torch.Tensor:
    """logits: (n, V) float32 after the logits processors, not all rows greedy. Returns (n,) int64 ids."""
    ids = logits.argmax(dim=-1)
    hot = m.temperature > 0
    filtered = torch.zeros_like(hot)
    if m.any_top_k:  # a top-k that keeps the whole vocabulary is no filter (the same draws as without it)
        filtered |= (m.top_k > 0) & (m.top_k < logits.shape[1])
    if m.any_top_p:
        filtered |= m.top_p < 1
    if m.any_min_p:
        filtered |= m.min_p > 0
    plain = torch.nonzero(hot & ~filtered).flatten()
    if len(plain) == len(ids):  # the common case: no row copies
        return _two_level(logits, logits.gather(1, ids[:, None]), m.temperature, _uniforms(plain.tolist(), m))
    if len(plain):
        rows_logits = logits[plain]
        ids[plain] = _two_level(rows_logits, rows_logits.gather(1, ids[plain, None]), m.temperature[plain],
                                _uniforms(plain.tolist(), m))
    rows = torch.nonzero(hot & filtered).flatten()
    if not len(rows):
        return ids
    row_list = rows.tolist()
    scaled = logits[rows] / m.temperature[rows, None]
    u = _uniforms(row_list, m)
    drawn, complete = _filtered(scaled, m, rows, u)
    ids[rows] = drawn
    for i in torch.nonzero(~complete).flatten().tolist():  # the kept set may reach past the candidates
        row = row_list[i]
        one = SamplingMetadata(m.temperature[row:row + 1], m.top_k[row:row + 1], m.top_p[row:row + 1],
                               m.min_p[row:row + 1], False, m.any_top_k, m.any_top_p, m.any_min_p, {}, False)
        ids[row] = _draw(apply_top_k_top_p_min_p(scaled[i:i + 1], one).softmax(-1).double(), u[i:i + 1])[0, 0]
    return ids
