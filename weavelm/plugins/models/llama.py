"""Llama, Mistral and Qwen2 (the shared decoder of `decoder.py`, registered as the `llama` model plugin)."""

from __future__ import annotations

from weavelm.plugin import hookimpl
from weavelm.plugins.models.decoder import LlamaForCausalLM


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("model", LlamaForCausalLM.name, LlamaForCausalLM)
