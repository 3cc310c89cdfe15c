"""The user-facing results of pooling requests, in vLLM's shapes: `llm.encode` gives `PoolingRequestOutput`
(`.outputs.data`, a float32 tensor), `llm.embed` gives `EmbeddingRequestOutput` (`.outputs.embedding`, a list of
floats) and `llm.score` gives `ScoringRequestOutput` (`.outputs.score`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PoolingOutput:
    """One prompt's pooled hidden state (after normalization when the pooler normalizes)."""

    data: torch.Tensor


@dataclass
class PoolingRequestOutput:
    request_id: str
    outputs: PoolingOutput
    prompt_token_ids: list[int]
    finished: bool = True
    prompt: str | None = None


@dataclass
class EmbeddingOutput:
    """vLLM's `EmbeddingOutput`: the embedding as a list of floats."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool = True
    prompt: str | None = None

    @classmethod
    def from_base(cls, out: PoolingRequestOutput) -> EmbeddingRequestOutput:
        return cls(out.request_id, EmbeddingOutput(out.outputs.data.tolist()), out.prompt_token_ids, out.finished,
                   out.prompt)


@dataclass
class ScoringOutput:
    """vLLM's `ScoringOutput`: for an embedding model, the cosine similarity of the two texts' embeddings."""

    score: float


@dataclass
class ScoringRequestOutput:
    request_id: str
    outputs: ScoringOutput
    prompt_token_ids: list[int]  # the two texts' token ids, one after the other
    finished: bool = True
