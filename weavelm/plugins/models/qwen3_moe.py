"""Qwen3-MoE: the Qwen3 decoder (per-head Q/K RMSNorm) with a mixture of experts (`norm_topk_prob` from the
config); `decoder_sparse_step` and `mlp_only_layers` keep some layers dense."""

from __future__ import annotations

from typing import Any

from torch import nn

from weavelm.layers import TensorParallelGroup
from weavelm.plugin import hookimpl
from weavelm.plugins.models.moe_decoder import DecoderDims, MoeForCausalLM, qwen_moe_layer


class Qwen3MoeForCausalLM(MoeForCausalLM):
    name = "qwen3_moe"
    description = "Qwen3-MoE decoder (Q/K RMSNorm, FusedMoE experts, tensor-parallel)."
    hf_architectures = ("Qwen3MoeForCausalLM",)
    qk_norm = True

    def feed_forward(self, cfg: Any, d: DecoderDims, layer_idx: int, tp: TensorParallelGroup) -> nn.Module:
        return qwen_moe_layer(cfg, d, layer_idx, tp, 0, self.expert_parallel)


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("model", Qwen3MoeForCausalLM.name, Qwen3MoeForCausalLM)
