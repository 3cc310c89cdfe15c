"""The one public façade for plugin authors: everything a third-party component needs, importable from here.

    from weavelm.plugin import hookimpl, AttentionBackend, AttentionImpl, API_VERSION

    WEAVELM_API_VERSION = API_VERSION      # the plugin API this module was written for (checked at load)

    @hookimpl
    def weavelm_register(registry):
        registry.add("attention", MyBackend.name, MyBackend)

A model plugin builds its architecture from the public layer library, `weavelm.layers` (tensor-parallel linears,
vocabulary-parallel embedding and head, RMSNorm, rotary, SiLU-and-mul, the attention layer); its key classes are
re-exported here. Every registered kind's ABC is here too (`COMPONENT_KINDS` -> `KIND_ABCS`).

Names exported here follow `API_VERSION` (semantic: a major bump breaks plugins, a minor one only adds).
Anything not exported here is internal and may change without notice.
"""

from weavelm.core.contexts import (ExecutorContext, RunnerContext, SchedulerContext, SchedulerLimits,
                                   WorkerContext)
from weavelm.core.forward import AttentionSpec, CommonAttentionMetadata, ForwardBatch, make_layer_impl
from weavelm.core.hookspecs import hookimpl
from weavelm.core.graph_variants import CudaGraphVariants
from weavelm.core.interfaces import (API_VERSION, COMPONENT_KINDS, AttentionBackend, AttentionImpl,
                                     AttentionMetadataBuilder, Component, Executor, LoRAManager,
                                     ModelArchitecture, ModelLoader, ModelRunner, NoOptions, Scheduler, Worker)
from weavelm.core.kv_cache import KVCacheManager, KVCacheStats
from weavelm.core.multimodal import (MultiModalFeature, PlaceholderRange, SupportsMultiModal, split_by_rows,
                                     supports_multimodal)
from weavelm.core.proposer import Proposal, ProposeInput, Proposer, ProposerContext, ProposerOptions
from weavelm.core.quantization import QuantizationConfig, QuantizedTensor, QuantizeMethodBase, QuantSpec
from weavelm.core.outputs import (CachedRequestsData, EngineCoreOutput, ModelRunnerOutput, NewRequestData,
                                  RunnerFuture, SchedulerOutput, SchedulerStats)
from weavelm.core.request import Request, RequestStatus, SamplingParams
from weavelm.errors import ConfigError, EngineError, LoadError, PluginError, RequestError, WeaveError
from weavelm.layers import (Attention, ColumnParallelLinear, MergedColumnParallelLinear, ParallelLMHead,
                            QKVParallelLinear, RMSNorm, RotaryEmbedding, RowParallelLinear, SiluAndMul,
                            TensorParallelGroup, VocabParallelEmbedding, WeightsMapper, load_checkpoint)
from weavelm.ops.cache_write import write_kv_cache
from weavelm.scheduling import BaseScheduler, SchedulerOptions
from weavelm.spec_decode.batch import SpecDecodeBatch, SpecDecodeLimits
from weavelm.tools.interfaces import (DeltaFunctionCall, DeltaMessage, DeltaToolCall, ExtractedToolCalls,
                                      FunctionCall, ReasoningParser, ToolCall, ToolParser)
from weavelm.utils import cdiv

KIND_ABCS = {"scheduler": Scheduler, "executor": Executor, "worker": Worker, "model_runner": ModelRunner,
             "loader": ModelLoader, "attention": AttentionBackend, "model": ModelArchitecture,
             "lora_manager": LoRAManager, "proposer": Proposer, "quantization": QuantizationConfig,
             "tool_parser": ToolParser, "reasoning_parser": ReasoningParser}
"""The interface each registered kind's components implement (one entry per `COMPONENT_KINDS`)."""

__all__ = [
    "API_VERSION", "COMPONENT_KINDS", "hookimpl",
    "Component", "NoOptions",
    "Scheduler", "SchedulerContext", "SchedulerLimits", "BaseScheduler", "SchedulerOptions",
    "ExecutorContext", "WorkerContext", "RunnerContext", "Executor", "Worker", "ModelRunner", "ModelLoader", "ModelArchitecture",
    "AttentionBackend", "AttentionImpl", "AttentionMetadataBuilder", "AttentionSpec", "CommonAttentionMetadata",
    "ForwardBatch", "make_layer_impl", "KVCacheManager", "KVCacheStats", "CudaGraphVariants",
    "SchedulerOutput", "NewRequestData", "CachedRequestsData", "ModelRunnerOutput", "RunnerFuture",
    "EngineCoreOutput", "SchedulerStats", "Request", "RequestStatus", "SamplingParams",
    "WeaveError", "ConfigError", "PluginError", "LoadError", "RequestError", "EngineError",
    "write_kv_cache", "cdiv",
    "Proposer", "ProposerOptions", "ProposerContext", "ProposeInput", "Proposal",
    "SpecDecodeBatch", "SpecDecodeLimits",
    "QuantizationConfig", "QuantizeMethodBase", "QuantSpec", "QuantizedTensor", "LoRAManager", "KIND_ABCS",
    "TensorParallelGroup", "ColumnParallelLinear", "MergedColumnParallelLinear", "QKVParallelLinear",
    "RowParallelLinear", "VocabParallelEmbedding", "ParallelLMHead", "RMSNorm", "RotaryEmbedding", "SiluAndMul",
    "Attention", "WeightsMapper", "load_checkpoint",
    "ToolParser", "ReasoningParser", "ExtractedToolCalls", "ToolCall", "FunctionCall", "DeltaMessage",
    "DeltaToolCall", "DeltaFunctionCall",
    "SupportsMultiModal", "MultiModalFeature", "PlaceholderRange", "supports_multimodal", "split_by_rows",
]
