"""`SamplingParams.n`: one request fanned out into n child requests whose outputs merge into one RequestOutput
(vLLM's ParentRequest). Children are ordinary core requests with ids `{index}_{parent id}`; a seeded parent gives
child i the seed `seed + i` (wrapping in int64), so completions differ yet each is reproducible."""

from __future__ import annotations

from dataclasses import replace

from weavelm.core.outputs import CompletionOutput, RequestOutput
from weavelm.core.request import INT64_MIN, SamplingParams


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    seed = params.seed
    if seed is not None:
        seed = (seed + index - INT64_MIN) % (1 << 64) + INT64_MIN
    return replace(params, n=1, seed=seed)


class ParentRequest:
    """Merges the children's outputs. `merge` is called with each child's latest RequestOutput (cumulative, or this
    step's delta) and returns the parent's RequestOutput, or None while there is nothing to hand out yet."""

    def __init__(self, request_id: str, n: int):
        self.request_id = request_id
        self.child_ids = [f"{i}_{request_id}" for i in range(n)]
        self.completions: dict[int, CompletionOutput] = {}
        self.finished: set[int] = set()
        self.num_cached_tokens = 0
        self.error: str | None = None

    def merge(self, child: RequestOutput, finished_only: bool, delta: bool) -> RequestOutput | None:
        completion = child.outputs[0]
        self.completions[completion.index] = completion
        if child.finished:
            self.finished.add(completion.index)
        self.num_cached_tokens = max(self.num_cached_tokens, child.num_cached_tokens)
        self.error = self.error or child.error
        done = len(self.finished) == len(self.child_ids)
        if finished_only and not done:
            return None
        outputs = [completion] if delta else [self.completions[i] for i in sorted(self.completions)]
        return RequestOutput(self.request_id, child.prompt, child.prompt_token_ids, outputs, done,
                             self.num_cached_tokens, self.error, child.metrics, child.prompt_logprobs)
