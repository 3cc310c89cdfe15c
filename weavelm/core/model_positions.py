"""Models whose `forward` takes several position rows per token (M-RoPE of Qwen2-VL / Qwen2.5-VL), and the
contract through which the runner asks them for those positions.

Most architectures take `positions` (tokens,): a token's index in its request. A model that declares
`position_rows = R > 1` takes `positions` (R, tokens) instead, and computes them itself, per request, from the
prompt's token ids and multimodal items: the runner calls `request_positions(prompt_token_ids, mm_features)` once
when a request arrives and, every step, `rows(index)` of the returned object for the token indices it schedules
(a prefill chunk, a decode token, speculative drafts). Nothing in the runner knows what the rows mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np


class RequestPositions(Protocol):
    """One request's positions: `rows(index)` -> (position_rows, len(index)) int64 for the request's token indices
    `index` (int64, any order, prompt and later tokens alike)."""

    def rows(self, index: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class SupportsRequestPositions(Protocol):
    """A `ModelArchitecture` whose `forward` takes (position_rows, tokens) positions.

    - `position_rows`: how many rows (> 1).
    - `request_positions(prompt_token_ids, mm_features)`: the request's `RequestPositions`; `mm_features` are its
      `weavelm.core.multimodal.MultiModalFeature` items in prompt order (None for a text prompt). Raise
      ValueError when the features do not fit the prompt.
    """

    position_rows: ClassVar[int]

    def request_positions(self, prompt_token_ids: Sequence[int], mm_features: Sequence[Any] | None
                          ) -> RequestPositions: ...


def position_rows(model: Any) -> int:
    """Rows of `positions` a model's forward takes (1 for all but `SupportsRequestPositions` models)."""
    return int(getattr(model, "position_rows", 1))
