"""weavelm's public model library (vLLM's `model_executor/layers`): what an architecture is built from.

    from weavelm.layers import (QKVParallelLinear, MergedColumnParallelLinear, RowParallelLinear,
                                VocabParallelEmbedding, ParallelLMHead, RMSNorm, RotaryEmbedding, SiluAndMul,
                                Attention, WeightsMapper, load_checkpoint)

Every parameter carries a `weight_loader(param, loaded, shard_id=None)` that copies this rank's shard of a
whole-model checkpoint tensor. A model made of these layers gets tensor parallelism (each layer shards itself by
the `TensorParallelGroup` it is given), quantization (methods attach to the linears by `quant_kind`) and LoRA (the
LoRA manager replaces layers by type, guided by the model's `packed_modules_mapping`) without code of its own.
Names exported here follow `weavelm.plugin.API_VERSION`.
"""

from weavelm.distributed import ParallelContext, TensorParallelGroup
from weavelm.layers.activation import GeluAndMul, SiluAndMul
from weavelm.layers.attention import Attention
from weavelm.layers.expert_parallel import ExpertParallel
from weavelm.layers.fused_moe import FusedMoE, load_moe_checkpoint
from weavelm.layers.layernorm import GemmaRMSNorm, RMSNorm
from weavelm.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, OutputSegment,
                                   QKVParallelLinear, RowParallelLinear, copy_shard, default_weight_loader,
                                   linear_apply)
from weavelm.layers.pipeline import IntermediateTensors, PipelineStage, PPMissingLayer, make_layers
from weavelm.layers.rotary import ROPE_TYPES, RopeParameters, RotaryEmbedding, rope_parameters
from weavelm.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from weavelm.layers.weights import WeightsMapper, load_checkpoint
from weavelm.layers.windows import layer_windows

__all__ = [
    "layer_windows",
    "TensorParallelGroup", "ParallelContext",
    "ColumnParallelLinear", "MergedColumnParallelLinear", "QKVParallelLinear", "RowParallelLinear",
    "OutputSegment", "VocabParallelEmbedding", "ParallelLMHead",
    "RMSNorm", "GemmaRMSNorm", "SiluAndMul", "GeluAndMul",
    "RotaryEmbedding", "RopeParameters", "rope_parameters", "ROPE_TYPES", "Attention",
    "WeightsMapper", "load_checkpoint", "copy_shard", "default_weight_loader", "linear_apply",
    "FusedMoE", "load_moe_checkpoint", "ExpertParallel",
    "IntermediateTensors", "PipelineStage", "PPMissingLayer", "make_layers",
]
