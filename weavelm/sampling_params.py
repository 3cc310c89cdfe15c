"""vLLM's `vllm.sampling_params` module path: `from weavelm.sampling_params import SamplingParams` ports unchanged."""

from weavelm.core.request import SamplingParams, StructuredOutputsParams
from weavelm.core.vllm_sampling import RequestOutputKind

__all__ = ["RequestOutputKind", "SamplingParams", "StructuredOutputsParams"]
