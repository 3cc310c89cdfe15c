"""weavelm's shipped model contract, run against this architecture (found through the installed entry point):
a tiny random Phi-3 saved by transformers gives transformers' greedy tokens and logits with one rank, the same
tokens on two ranks (multiproc, gloo), peft's merged-model tokens with an adapter on the fused modules, and the
same tokens with n-gram speculation. Plus Phi-3's own rope: `longrope` and a partial rotary head."""

from __future__ import annotations

import pytest
from transformers import Phi3Config

from weavelm.testing.model import ModelContract

FUSED = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


class TestPhi3(ModelContract):
    config_class = Phi3Config
    lora_target_modules = FUSED


class TestPhi3LongRope(ModelContract):
    """Phi-3's long-context rope (short factors within the original context) and half-rotary heads."""

    config_class = Phi3Config
    config_kwargs = {"max_position_embeddings": 256, "original_max_position_embeddings": 64,
                     "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                         "short_factor": [1.0 + i / 8 for i in range(4)],
                                         "long_factor": [4.0 + i for i in range(4)]}}

    @pytest.mark.skip(reason="covered by TestPhi3: the rope does not change how the layers shard")
    def test_tensor_parallel_matches_single_rank(self):
        raise AssertionError("skipped")


def test_unsupported_rope_type_is_a_typed_error(tmp_path):
    """transformers' Phi3Config refuses it when reading config.json (LoadError); weavelm.layers would (ConfigError)."""
    import json

    from transformers import AutoModelForCausalLM

    from weavelm import LLM
    from weavelm.errors import ConfigError, LoadError

    cfg = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        raw = json.load(f)
    raw["rope_parameters"] = {"rope_type": "mrope", "rope_theta": 10000.0}
    with open(tmp_path / "config.json", "w") as f:
        json.dump(raw, f)
    with pytest.raises((ConfigError, LoadError), match="mrope"):
        LLM(model=str(tmp_path), dtype="float32", device="cpu")
