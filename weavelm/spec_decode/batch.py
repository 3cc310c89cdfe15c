"""The runner's side of the speculative-decoding contract: the batch view `SpecDecodeRunner` reads and writes, and
the limits it needs. A model runner hosts speculative decoding by handing `SpecDecodeRunner` an object with these
members (the default runner's persistent `InputBatch` is one) and calling its hook points (see `runner.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch

    from weavelm.core.request import SamplingParams


@runtime_checkable
class SpecDecodeBatch(Protocol):
    """A runner's persistent batch as speculative decoding sees it: one row per running request, rows
    [0, len(req_ids)) occupied. Arrays are host numpy arrays indexed by row (their first dimension may be larger
    than the number of rows). Read and written only on the runner's thread, between forwards.

    req_ids: the request of each row, in row order; index: request id -> row.
    token_ids: (max_rows, max_model_len + 1) int64. Row r's known tokens (prompt + output) are
      token_ids[r, :num_tokens[r]]; speculative decoding writes a step's drafts right after them (the runner's input
      preparation then feeds `[last token, drafts...]`) and appends each step's emitted tokens (num_tokens grows).
    num_tokens, num_prompt: (max_rows,) int64, known and prompt tokens per row.
    block_table: (max_rows, max_blocks) int32 KV block ids; num_blocks: (max_rows,) int64, valid entries per row.
    temperature: (max_rows,) float32, 0 = greedy.
    processed: (max_rows,) bool, rows that use a logits processor reading their history (penalties, bad words,
      min_tokens, logit bias); they get no drafts.
    """

    req_ids: list[str]
    index: dict[str, int]
    token_ids: np.ndarray
    num_tokens: np.ndarray
    num_prompt: np.ndarray
    block_table: np.ndarray
    num_blocks: np.ndarray
    temperature: np.ndarray
    processed: np.ndarray

    @property
    def num_reqs(self) -> int:
        """Occupied rows."""

    def sampling_params(self, row: int) -> SamplingParams:
        """The request's sampling parameters (max_tokens, num_logprobs)."""

    def generator(self, row: int) -> torch.Generator | None:
        """The request's generator when it is seeded, else None."""

    def keep_blocks(self, row: int, num_blocks: int) -> None:
        """Drop the row's block ids past the first `num_blocks` (the scheduler freed them after a rollback), in
        the row and in the request's state kept across preemption."""


@dataclass(frozen=True)
class SpecDecodeLimits:
    """What `SpecDecodeRunner` needs from the runner besides its batch: the KV block size, the target's context
    length (no draft past it) and the device the step's tensors live on."""

    block_size: int
    max_model_len: int
    device: torch.device
