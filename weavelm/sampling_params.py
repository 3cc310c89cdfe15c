"""vLLM's import path: `from weavelm.sampling_params import SamplingParams, StructuredOutputsParams`."""

from weavelm.core.request import SamplingParams, StructuredOutputsParams

__all__ = ["SamplingParams", "StructuredOutputsParams"]
