"""Mixtral: the Llama decoder with a sparse mixture of experts (`block_sparse_moe`) in every layer; the top-k
routing weights are always renormalised."""

from __future__ import annotations

from typing import Any

from torch import nn

from weavelm.layers import FusedMoE, TensorParallelGroup
from weavelm.plugin import hookimpl
from weavelm.plugins.models.moe_decoder import DecoderDims, MoeForCausalLM


class MixtralForCausalLM(MoeForCausalLM):
    name = "mixtral"
    description = "Mixtral sparse mixture-of-experts decoder (FusedMoE experts, tensor-parallel)."
    hf_architectures = ("MixtralForCausalLM",)
    moe_attr = "block_sparse_moe"

    def feed_forward(self, cfg: Any, d: DecoderDims, layer_idx: int, tp: TensorParallelGroup) -> nn.Module:
        return FusedMoE(d.hidden, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok,
                        renormalize=True, tp=tp, ep=self.expert_parallel)


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("model", MixtralForCausalLM.name, MixtralForCausalLM)
