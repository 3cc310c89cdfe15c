"""Prompt-lookup (n-gram) proposer: drafts the tokens that followed the latest earlier occurrence of the sequence's
last n tokens (n from `prompt_lookup_max` down to `prompt_lookup_min`). No model, no KV cache; each draft is a point
mass, so verification is the plain accept-if-likely rule. It pays off when the output quotes its input
(summaries, edits, code changes, retrieval answers)."""

from __future__ import annotations

import numpy as np
from pydantic import Field, model_validator

from weavelm.core.hookspecs import hookimpl
from weavelm.spec_decode.proposer import Proposal, ProposeInput, Proposer, ProposerOptions


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
    """The (up to) k tokens after the latest earlier occurrence of the longest suffix n-gram, n in [n_min, n_max]."""
    length = len(tokens)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        suffix = tokens[length - n:]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:length - 1], n)  # starts 0 .. length-1-n
        hits = np.nonzero((windows == suffix).all(axis=1))[0]
        hits = hits[hits + n < length]  # something follows the match (excludes the suffix itself)
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start:start + k].tolist()
    return []


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
