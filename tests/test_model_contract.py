"""The shipped model-architecture contract (`weavelm.testing.model`) on the built-in Llama and Qwen3: parity of
tokens and logits with transformers, two tensor-parallel ranks, LoRA against peft's merge (on one and two ranks),
and n-gram speculation. The Phi-3 example runs the same suite from its own folder (tests/test_phi3_example.py)."""

from __future__ import annotations

from transformers import LlamaConfig, Qwen3Config

from weavelm.testing.model import ModelContract


class TestLlama(ModelContract):
    config_class = LlamaConfig
    lora_target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TestQwen3(ModelContract):
    config_class = Qwen3Config
    config_kwargs = {"head_dim": 16, "num_key_value_heads": 1}  # one KV head: replicated on both ranks
    lora_target_modules = ["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"]
