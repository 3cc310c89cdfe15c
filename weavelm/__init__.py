"""weavelm: a plugin-based LLM inference engine."""

from weavelm.core.async_llm import AsyncLLM
from weavelm.core.config import EngineConfig
from weavelm.core.llm import LLM
from weavelm.core.llm_engine import LLMEngine
from weavelm.core.outputs import CompletionOutput, RequestOutput
from weavelm.core.request import SamplingParams, StructuredOutputsParams
from weavelm.core.vllm_args import EngineArgs
from weavelm.errors import (ConfigError, EngineDeadError, EngineError, LoadError, PluginError, RequestError,
                            WeaveError)
from weavelm.inputs import TextPrompt, TokensPrompt
from weavelm.lora.request import LoRARequest

__version__ = "0.1.0"
__all__ = ["LLM", "LLMEngine", "AsyncLLM", "SamplingParams", "StructuredOutputsParams", "LoRARequest", "EngineConfig", "RequestOutput",
           "CompletionOutput", "WeaveError", "ConfigError", "PluginError", "LoadError", "RequestError", "EngineError", "EngineDeadError",
           "TextPrompt", "TokensPrompt", "EngineArgs", "__version__"]
