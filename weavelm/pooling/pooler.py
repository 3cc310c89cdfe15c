"""The runner-side pooler: turns the final hidden states (before the LM head) of each prompt into one vector.

A prompt may arrive over several steps (chunked prefill). The pooler keeps what it needs between chunks, per
request: the running sum of the hidden states (MEAN) or the first token's state (CLS); LAST needs only the final
chunk. A chunk that starts at position 0 starts the request afresh (a request preempted by recompute runs its prompt
again from 0). Every position must be computed by the model: pooling engines do not read the prefix cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from weavelm.pooling.config import ResolvedPooler


class Pooler:
    """Pools one step's prompt chunks. `pool(...)` returns {req_id: embedding} for the requests whose prompt
    finished this step; `forget(req_ids)` drops the state of finished or aborted requests."""

    def __init__(self, resolved: ResolvedPooler):
        self.pooling_type = resolved.pooling_type
        self.normalize = resolved.normalize
        self._partial: dict[str, torch.Tensor] = {}  # MEAN: float32 sum so far; CLS: the first token's state

    def forget(self, req_ids: Iterable[str]) -> None:
        for rid in req_ids:
            self._partial.pop(rid, None)

    def pool(self, hidden: torch.Tensor, req_ids: Sequence[str], query_start_loc: Sequence[int],
             num_computed: Sequence[int], prompt_lens: Sequence[int]) -> dict[str, list[float]]:
        """hidden: (tokens, hidden size), the step's final hidden states; row i of the batch (request `req_ids[i]`)
        owns rows `query_start_loc[i]:query_start_loc[i + 1]`, its prompt positions from `num_computed[i]`, of a
        prompt of `prompt_lens[i]` tokens."""
        done_ids: list[str] = []
        done: list[torch.Tensor] = []
        for i, rid in enumerate(req_ids):
            start, end = query_start_loc[i], query_start_loc[i + 1]
            if end == start:
                continue
            chunk = hidden[start:end]
            first = num_computed[i]
            vec = self._fold(rid, chunk, first)
            if first + (end - start) >= prompt_lens[i]:
                done_ids.append(rid)
                done.append(vec if self.pooling_type != "MEAN" else vec / prompt_lens[i])
                self._partial.pop(rid, None)
        if not done:
            return {}
        pooled = torch.stack(done).float()
        if self.normalize:
            pooled = F.normalize(pooled, p=2, dim=-1)
        return dict(zip(done_ids, pooled.cpu().tolist()))

    def _fold(self, rid: str, chunk: torch.Tensor, first: int) -> torch.Tensor | None:
        """Fold one chunk into the request's state and return the state (LAST: the chunk's last row)."""
        kind = self.pooling_type
        if kind == "LAST":
            return chunk[-1]
        if kind == "CLS":
            if first == 0:
                self._partial[rid] = chunk[0].float()
            return self._partial.get(rid)
        total = chunk.float().sum(0)
        if first > 0:
            total += self._partial[rid]
        self._partial[rid] = total
        return total
