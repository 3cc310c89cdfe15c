"""Logprob tensors of sampled rows back into the {token_id: Logprob} dicts that ModelRunnerOutput carries."""

from __future__ import annotations

from weavelm.core.outputs import Logprob, TokenLogprobs
from weavelm.sample.sampler import SampledLogprobs


def to_token_logprobs(ids: list[int], lp: SampledLogprobs, want: list[int | None]) -> list[TokenLogprobs | None]:
    """One {token_id: Logprob} per row: the chosen token first, then the row's top `want[i]` (None: skipped)."""
    sampled, ranks = lp.sampled.tolist(), lp.sampled_rank.tolist()
    top_ids, top_lps = lp.top_ids.tolist(), lp.top_logprobs.tolist()
    out: list[TokenLogprobs | None] = []
    for i, n in enumerate(want):
        if n is None:
            out.append(None)
            continue
        d = {ids[i]: Logprob(sampled[i], ranks[i])}
        for r in range(n):
            d.setdefault(top_ids[i][r], Logprob(top_lps[i][r], r + 1))
        out.append(d)
    return out
