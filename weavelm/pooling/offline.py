"""`LLM.embed`, `LLM.encode` and `LLM.score` (vLLM's offline pooling API), for an `LLM(..., runner="pooling")`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from weavelm.core.request import SamplingParams
from weavelm.errors import RequestError
from weavelm.pooling.outputs import (EmbeddingRequestOutput, PoolingOutput, PoolingRequestOutput, ScoringOutput,
                                     ScoringRequestOutput)

POOLING_ONLY = ("this engine runs runner='generate'; embeddings need a pooling engine: LLM(model, runner='pooling') "
                "(or `runner: pooling` in the config, `weavelm serve --runner pooling`)")


class PoolingMethods:
    """The pooling half of `LLM` (mixed into it): each method runs its prompts to the end of their prefill and
    returns one output per prompt, in order. An invalid prompt raises RequestError naming it (as vLLM raises)."""

    def encode(self, prompts: Any, pooling_params: Any = None, *, use_tqdm: bool = False, lora_request: Any = None,
               truncate_prompt_tokens: int | None = None) -> list[PoolingRequestOutput]:
        """Each prompt's pooled final hidden state (`.outputs.data`, a float32 tensor), as the engine's pooler
        makes it (see `weavelm.pooling.config`)."""
        if self.config.runner != "pooling":
            raise RequestError(POOLING_ONLY)
        if pooling_params is not None:
            raise RequestError("pooling_params: not supported; the pooler is chosen per engine (the model's "
                               "sentence-transformers config or the `pooler:` section)")
        if truncate_prompt_tokens is not None:
            raise RequestError("truncate_prompt_tokens: not supported; shorten the prompts before embedding them")
        outs = self._run_requests(prompts, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm, lora_request,
                                  "embed")
        results = []
        for out in outs:
            if out.error is not None or out.pooling_output is None:
                raise RequestError(f"prompt {out.prompt!r}: {out.error or 'no embedding was produced'}")
            results.append(PoolingRequestOutput(out.request_id, PoolingOutput(torch.tensor(out.pooling_output)),
                                                out.prompt_token_ids, True, out.prompt))
        return results

    def embed(self, prompts: Any, pooling_params: Any = None, *, use_tqdm: bool = False, lora_request: Any = None,
              truncate_prompt_tokens: int | None = None) -> list[EmbeddingRequestOutput]:
        """vLLM's `LLM.embed`: one `EmbeddingRequestOutput` per prompt, `.outputs.embedding` a list of floats."""
        return [EmbeddingRequestOutput.from_base(o) for o in
                self.encode(prompts, pooling_params, use_tqdm=use_tqdm, lora_request=lora_request,
                            truncate_prompt_tokens=truncate_prompt_tokens)]

    def score(self, data_1: Any, data_2: Any, *, use_tqdm: bool = False, lora_request: Any = None
              ) -> list[ScoringRequestOutput]:
        """vLLM's `LLM.score` for an embedding model (a bi-encoder): the cosine similarity of the embeddings of
        each pair. `data_1` and `data_2` are prompts or lists of prompts: one against N (1:N) or N against N
        (pairwise)."""
        first, second = _as_list(data_1, "data_1"), _as_list(data_2, "data_2")
        if len(first) == 1 and len(second) > 1:
            first = first * len(second)
        if len(first) != len(second):
            raise RequestError(f"data_1, data_2: {len(first)} and {len(second)} prompts; give one against N or N "
                               f"against N")
        embedded = self.encode(first + second, use_tqdm=use_tqdm, lora_request=lora_request)
        n = len(first)
        outs = []
        for a, b in zip(embedded[:n], embedded[n:]):
            score = torch.nn.functional.cosine_similarity(a.outputs.data, b.outputs.data, dim=0).item()
            outs.append(ScoringRequestOutput(a.request_id, ScoringOutput(score),
                                             a.prompt_token_ids + b.prompt_token_ids))
        return outs


def _as_list(data: Any, name: str) -> list:
    if isinstance(data, (str, dict)):
        return [data]
    if isinstance(data, Sequence) and data and not isinstance(data[0], int):
        return list(data)
    if isinstance(data, Sequence) and data:
        return [list(data)]  # one token-id prompt
    raise RequestError(f"{name}: expected a prompt or a non-empty list of prompts")
