"""Qwen2-MoE: the Qwen2 decoder (Q/K/V biases) with a mixture of experts plus a sigmoid-gated shared expert;
`decoder_sparse_step` and `mlp_only_layers` keep some layers dense."""

from __future__ import annotations

from typing import Any

from torch import nn

from weavelm.layers import TensorParallelGroup
from weavelm.plugin import hookimpl
from weavelm.plugins.models.moe_decoder import DecoderDims, MoeForCausalLM, qwen_moe_layer


class Qwen2MoeForCausalLM(MoeForCausalLM):
    name = "qwen2_moe"
    description = "Qwen2-MoE decoder (FusedMoE experts with a gated shared expert, tensor-parallel)."
    hf_architectures = ("Qwen2MoeForCausalLM",)

    @staticmethod
    def _biases(cfg: Any) -> tuple[bool, bool]:
        return bool(getattr(cfg, "qkv_bias", True)), False

    def feed_forward(self, cfg: Any, d: DecoderDims, layer_idx: int, tp: TensorParallelGroup) -> nn.Module:
        return qwen_moe_layer(cfg, d, layer_idx, tp, getattr(cfg, "shared_expert_intermediate_size", 0) or 0,
                              self.expert_parallel)


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("model", Qwen2MoeForCausalLM.name, Qwen2MoeForCausalLM)
