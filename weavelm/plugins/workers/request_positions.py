"""The runner's side of `weavelm.core.model_positions`: each live request's `RequestPositions` for a model that
takes several position rows, and one step's (rows, tokens) positions built from them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from weavelm.core.model_positions import RequestPositions, position_rows


class PositionTable:
    """{req_id: RequestPositions} of a `SupportsRequestPositions` model (`for_model` is None for other models)."""

    def __init__(self, model: Any):
        self.model, self.num_rows = model, position_rows(model)
        self.requests: dict[str, RequestPositions] = {}

    @classmethod
    def for_model(cls, model: Any) -> PositionTable | None:
        return cls(model) if position_rows(model) > 1 else None

    def add(self, req_id: str, prompt_token_ids: Sequence[int], mm_features: Sequence[Any] | None) -> None:
        """A new request (a resumed one keeps its entry)."""
        if req_id not in self.requests:
            self.requests[req_id] = self.model.request_positions(prompt_token_ids, mm_features)

    def remove(self, req_ids: Iterable[str]) -> None:
        for rid in req_ids:
            self.requests.pop(rid, None)

    def build(self, req_ids: Sequence[str], num_scheduled: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """(rows, total) int64: the step's flat token indices `positions` (each request's `num_scheduled` in
        batch order) as the model's position rows."""
        out = np.empty((self.num_rows, len(positions)), dtype=np.int64)
        start = 0
        for rid, n in zip(req_ids, num_scheduled.tolist()):
            out[:, start:start + n] = self.requests[rid].rows(positions[start:start + n])
            start += n
        return out
