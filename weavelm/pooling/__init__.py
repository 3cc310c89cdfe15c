"""Embeddings and pooling (vLLM's `runner="pooling"`): the pooler config and its resolution from a model folder's
sentence-transformers files, the runner-side pooler, and the user-facing pooling outputs."""

from weavelm.pooling.config import PoolerConfig, ResolvedPooler, resolve_pooler
from weavelm.pooling.outputs import (EmbeddingOutput, EmbeddingRequestOutput, PoolingOutput, PoolingRequestOutput,
                                     ScoringOutput, ScoringRequestOutput)

__all__ = ["PoolerConfig", "ResolvedPooler", "resolve_pooler", "EmbeddingOutput", "EmbeddingRequestOutput",
           "PoolingOutput", "PoolingRequestOutput", "ScoringOutput", "ScoringRequestOutput"]
