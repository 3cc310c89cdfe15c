"""Llama, Mistral and Qwen2 (the shared decoder of `decoder.py`, registered as the `llama` model plugin). The
mixture-of-experts decoders built on it (mixtral.py, qwen2_moe.py, qwen3_moe.py) register through this entry point
too."""

from __future__ import annotations

from weavelm.plugin import hookimpl
from weavelm.plugins.models.decoder import LlamaForCausalLM


@hookimpl
def weavelm_register(registry) -> None:
    from weavelm.plugins.models import mixtral, qwen2_moe, qwen3_moe

    registry.add("model", LlamaForCausalLM.name, LlamaForCausalLM)
    for moe in (mixtral, qwen2_moe, qwen3_moe):
        moe.weavelm_register(registry)
