"""The `proposer` plugin kind: what proposes draft tokens for speculative decoding.

A third party ships EAGLE or Medusa by subclassing `Proposer` (import it from `weavelm.plugin`) and registering it:

    @hookimpl
    def weavelm_register(registry):
        registry.add("proposer", MyProposer.name, MyProposer)

and an engine selects it with the YAML section `speculative: {name: my_proposer, num_speculative_tokens: 4}`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from weavelm.core.interfaces import Component

if TYPE_CHECKING:
    import torch

    from weavelm.core.contexts import RunnerContext

MAX_SPECULATIVE_TOKENS = 32


class ProposerOptions(BaseModel):
    """Options every proposer takes; a proposer's own `Options` subclass this."""

    model_config = ConfigDict(extra="forbid")
    num_speculative_tokens: int = Field(..., ge=1, le=MAX_SPECULATIVE_TOKENS,
                                        description="Draft tokens proposed (and verified) per request per step.")


@dataclass
class ProposerContext:
    """What a proposer is built with: the target runner's context (config, device, loader, architecture lookup,
    attention-backend selection, tensor-parallel group), the KV block size the target uses, and
    `load_model(model, dtype)`, the runner's own model loading (returns a bundle with `.model`, `.dtype`,
    `.max_model_len`, `.vocab_size`). A proposer with its own KV cache (`uses_kv_cache`) addresses it with the
    target's block ids, so its pool has the same block count and block size."""

    runner: RunnerContext
    block_size: int
    load_model: Callable[[str, str], Any]


@dataclass
class ProposeInput:
    """The rows to propose for, after this step's tokens were appended: the batch as a proposer sees it.

    req_ids: one per row. token_ids[i]: the row's known tokens (prompt + output), a read-only int64 array.
    num_computed_tokens: (rows,) int64, the tokens whose KV the target's cache holds: every known token but the
    last sampled one, so len(token_ids[i]) - 1.
    sampled_token_ids[i]: the tokens this step emitted for the row (accepted drafts, then one token from the target;
    one token after a step without drafts), the tail of token_ids[i].
    positions: (sum of len(sampled_token_ids[i]),) int64, row by row: the position whose target output each sampled
    token was drawn from (sampled token j of row i is token_ids[i][positions[k] + 1]).
    hidden_states: (sum of len(sampled_token_ids[i]), hidden_size) on the runner's device in the model's dtype: the
    target model's final hidden state (the LM head's input) at each of `positions`, in the same order; what an
    EAGLE-style head drafts from. None unless the proposer sets `uses_hidden_states`.
    max_tokens[i]: the most drafts the row may get (<= num_speculative_tokens; fewer near max_model_len, near the
    request's max_tokens or, for a KV-using proposer, near the end of the blocks reserved for it).
    block_table: (rows, max_blocks) int32, each row's KV block ids (valid up to num_blocks[i]); num_blocks: (rows,).
    temperature: (rows,) float32, 0 = greedy. generators[i]: the request's torch.Generator when seeded, else None;
    a proposer that samples must draw a seeded row's randomness from it, so seeded requests stay reproducible.
    The runner always sets num_computed_tokens, sampled_token_ids and positions; they default to None only so that a
    test can build a ProposeInput by hand.
    """

    req_ids: list[str]
    token_ids: list[np.ndarray]
    max_tokens: list[int]
    block_table: np.ndarray
    num_blocks: np.ndarray
    temperature: np.ndarray
    generators: list[Any]
    num_computed_tokens: np.ndarray | None = None
    sampled_token_ids: list[list[int]] | None = None
    positions: np.ndarray | None = None
    hidden_states: torch.Tensor | None = None


@dataclass
class Proposal:
    """Drafts per row (each at most `max_tokens[i]` long, possibly empty). `probs`: the draft distribution each
    draft token was sampled from, (total drafts, vocab) float32 on the runner's device in row order; None means each
    draft is a point mass (a deterministic proposer such as n-gram lookup)."""

    token_ids: list[list[int]]
    probs: torch.Tensor | None = None


class Proposer(Component, ABC):
    """Proposes draft tokens. Built by the assembler once per runner; called only by the runner, in this order:
    `load()` (after the target model is loaded), `kv_cache_bytes_per_block()`, `initialize_kv_cache(n)`, then per
    step `forget()` and `propose()`.

    `uses_kv_cache`: the proposer keeps its own paged KV cache (a draft model). The scheduler then reserves
    `num_speculative_tokens` lookahead slots in each sampling request's block table so the proposer can write the
    KV of its drafts there; the blocks it may use for row i are `block_table[i, :num_blocks[i]]`.
    `uses_hidden_states`: `ProposeInput.hidden_states` is filled (an EAGLE or Medusa head drafts from the target's
    hidden states); otherwise it is None and the runner keeps no hidden states for the proposer.
    """

    Options: ClassVar[type[BaseModel]] = ProposerOptions
    uses_kv_cache: ClassVar[bool] = False
    uses_hidden_states: ClassVar[bool] = False

    def __init__(self, options: ProposerOptions, context: ProposerContext):
        self.options = options
        self.context = context
        self.num_speculative_tokens = options.num_speculative_tokens

    def load(self, target_info: dict[str, Any]) -> None:
        """Load what the proposer needs (a draft model). `target_info` is the target runner's `model_info()`;
        raise ConfigError when the proposer cannot serve that target (e.g. a vocabulary mismatch)."""

    def kv_cache_bytes_per_block(self) -> int:
        """Bytes one KV block of the proposer's own cache takes (0 without one)."""
        return 0

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate the proposer's cache with `num_blocks` blocks (the target's count)."""

    def forget(self, req_ids: Iterable[str]) -> None:
        """Drop per-request state: the requests finished, were preempted (their blocks are gone) or are new."""

    @abstractmethod
    def propose(self, inp: ProposeInput) -> Proposal:
        """Draft tokens for every row of `inp`."""
