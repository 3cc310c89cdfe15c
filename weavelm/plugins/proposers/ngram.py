"""Prompt-lookup (n-gram) proposer: drafts the tokens that followed the latest earlier occurrence of the sequence's
last n tokens (n from `prompt_lookup_max` down to `prompt_lookup_min`). No model, no KV cache; each draft is a point
mass, so verification is the plain accept-if-likely rule. It pays off when the output quotes its input
(summaries, edits, code changes, retrieval answers)."""

from __future__ import annotations

import numpy as np
from pydantic import Field, model_validator

from weavelm.plugin import Proposal, ProposeInput, Proposer, ProposerOptions, hookimpl


class NgramOptions(ProposerOptions):
    prompt_lookup_min: int = Field(1, ge=1, le=64, description="Shortest suffix n-gram to look up.")
    prompt_lookup_max: int = Field(4, ge=1, le=64, description="Longest suffix n-gram to look up (tried first).")

    @model_validator(mode="after")
    def _ordered(self) -> NgramOptions:
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) must be <= prompt_lookup_max "
                             f"({self.prompt_lookup_max})")
        return self


def lookup(tokens: np.ndarray, n_min: int, n_max: int, k: int) -> list[int]:
    """The (up to) k tokens after the latest earlier occurrence of the longest suffix n-gram, n in [n_min, n_max].

    One vectorised pass finds every earlier occurrence of the last n_min tokens; the candidates are then extended
    backwards one token at a time (a longer match is a shorter one with a matching token before it)."""
    length = len(tokens)
    if length <= n_min:
        return []
    windows = np.lib.stride_tricks.sliding_window_view(tokens[:length - 1], n_min)  # excludes the suffix itself
    cands = np.nonzero((windows == tokens[length - n_min:]).all(axis=1))[0]
    if not len(cands):
        return []
    best = int(cands[-1])
    for n in range(n_min + 1, min(n_max, length - 1) + 1):
        back = n - n_min
        cands = cands[cands >= back]
        cands = cands[tokens[cands - back] == tokens[length - n]]
        if not len(cands):
            break
        best = int(cands[-1])
    return tokens[best + n_min:best + n_min + k].tolist()


class NgramProposer(Proposer):
    name = "ngram"
    description = "Prompt lookup: drafts what followed the last earlier occurrence of the latest n-gram."
    Options = NgramOptions

    def propose(self, inp: ProposeInput) -> Proposal:
        o = self.options
        return Proposal([lookup(t, o.prompt_lookup_min, o.prompt_lookup_max, k)
                         for t, k in zip(inp.token_ids, inp.max_tokens)])


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("proposer", NgramProposer.name, NgramProposer)
