"""Qwen3: the Llama decoder with per-head RMSNorm on queries and keys."""

from __future__ import annotations

from typing import Any

from weavelm.plugin import hookimpl
from weavelm.plugins.models.decoder import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    name = "qwen3"
    description = "Qwen3 decoder (Llama layout plus Q/K RMSNorm)."
    hf_architectures = ("Qwen3ForCausalLM",)
    qk_norm = True

    @staticmethod
    def _biases(cfg: Any) -> tuple[bool, bool]:
        bias = bool(getattr(cfg, "attention_bias", False))
        return bias, bias


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("model", Qwen3ForCausalLM.name, Qwen3ForCausalLM)
