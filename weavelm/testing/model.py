"""The model-architecture contract: for a transformers config, the registered architecture that serves it gives
transformers' greedy tokens and logits, the same tokens on two tensor-parallel ranks (multiproc executor, gloo, on
the CPU), with a PEFT LoRA adapter the tokens of peft's merged model (alone and on two ranks), and the same tokens
with n-gram speculation. Every parameter must sit in a `weavelm.layers` layer, which is what gives the model LoRA,
tensor parallelism and quantization without code of its own.

Subclass it in your distribution's tests with a tiny config of your architecture:

    from transformers import Phi3Config
    from weavelm.testing.model import ModelContract

    class TestPhi3(ModelContract):
        config_class = Phi3Config
        config_kwargs = {"num_key_value_heads": 2}                   # beside the suite's tiny defaults
        lora_target_modules = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]   # as PEFT names them

The model is made by transformers from a seed (`AutoModelForCausalLM.from_config`), saved with `save_pretrained`,
and run in float32 on the CPU, so token comparisons are exact.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import pytest
import torch

from weavelm.testing._registry import registry

PROMPTS = ([5, 17, 33, 8, 99, 4], [7, 7, 21, 100, 11], [42, 1, 3, 9, 25, 77, 13, 42, 1, 3], [3, 4, 60] * 4)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
ENGINE = dict(dtype="float32", device="cpu", attention="torch_ref")


class ModelContract:
    """Subclass and set `config_class` (and `config_kwargs`, `lora_target_modules`); pytest collects `test_*`."""

    config_class: ClassVar[type] = type(None)
    config_kwargs: ClassVar[dict[str, Any]] = {}
    lora_target_modules: ClassVar[list[str]] = []  # PEFT target_modules; empty: no LoRA tests
    lora_rank: ClassVar[int] = 8
    tensor_parallel_size: ClassVar[int] = 2
    speculative: ClassVar[dict[str, Any]] = {"name": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                             "prompt_lookup_max": 3}
    max_tokens: ClassVar[int] = 8
    seed: ClassVar[int] = 0

    # -- fixtures -----------------------------------------------------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def checkpoint(cls, tmp_path_factory) -> str:
        from transformers import AutoModelForCausalLM

        path = str(tmp_path_factory.mktemp(f"model_{cls.__name__}"))
        torch.manual_seed(cls.seed)
        config = cls.config_class(**{**TINY, **cls.config_kwargs})
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
        return path

    @pytest.fixture(scope="class")
    @classmethod
    def adapter(cls, checkpoint, tmp_path_factory) -> str:
        """A seeded random PEFT adapter (non-zero B) on `lora_target_modules`, saved by peft."""
        if not cls.lora_target_modules:
            pytest.skip("no lora_target_modules set")
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        path = str(tmp_path_factory.mktemp(f"adapter_{cls.__name__}"))
        torch.manual_seed(cls.seed + 1)
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(r=cls.lora_rank, lora_alpha=2 * cls.lora_rank,
                                                      target_modules=list(cls.lora_target_modules),
                                                      lora_dropout=0.0, init_lora_weights=False))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.mul_(0.5)
        peft_model.save_pretrained(path)
        return path

    @pytest.fixture(scope="class")
    @classmethod
    def reference(cls, checkpoint) -> list[list[int]]:
        """transformers' greedy tokens for PROMPTS."""
        return _hf_greedy(_hf_model(checkpoint), cls.max_tokens)

    @pytest.fixture(scope="class")
    @classmethod
    def engine(cls, checkpoint):
        from weavelm import LLM

        with LLM(model=checkpoint, **ENGINE) as llm:
            yield llm

    # -- tests --------------------------------------------------------------------------------------------
    def test_architecture_is_built_from_weavelm_layers(self, checkpoint):
        """Every parameter belongs to a `weavelm.layers` layer, and every packed module names its parts."""
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(checkpoint)
        cls = registry().find_model(hf_config.architectures[0])
        with torch.device("meta"):
            model = cls(hf_config)
        foreign = sorted({type(m).__qualname__ for m in model.modules() if list(m.parameters(recurse=False))
                          and not type(m).__module__.startswith("weavelm.layers")})
        assert not foreign, f"parameters outside weavelm.layers (no LoRA / TP / quantization for them): {foreign}"
        packed = getattr(model, "packed_modules_mapping", {})
        for name, module in model.named_modules():
            segments = getattr(module, "output_segments", None)
            if segments is not None and name.rsplit(".", 1)[-1] in packed:
                assert len(packed[name.rsplit(".", 1)[-1]]) == len(segments()), name

    def test_greedy_tokens_match_transformers(self, engine, reference):
        assert _generate(engine, self.max_tokens) == reference

    def test_logits_match_transformers(self, engine, checkpoint):
        from weavelm.testing.parity import prompt_logits

        model = _hf_model(checkpoint)
        for prompt in PROMPTS[:2]:
            with torch.no_grad():
                want = model(torch.tensor([prompt])).logits[0].float()
            got = prompt_logits(engine, list(prompt), all_positions=True)[:len(prompt)]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    def test_lora_matches_peft_merged_model(self, checkpoint, adapter, reference):
        from weavelm import LLM, LoRARequest

        merged = _merged_reference(checkpoint, adapter, self.max_tokens)
        assert merged != reference, "the adapter does not change the output; the test would prove nothing"
        with LLM(model=checkpoint, lora={"max_loras": 1, "max_lora_rank": self.lora_rank}, **ENGINE) as llm:
            assert _generate(llm, self.max_tokens, LoRARequest("contract", 1, adapter)) == merged
            assert _generate(llm, self.max_tokens) == reference

    def test_tensor_parallel_matches_single_rank(self, checkpoint, reference, request):
        """Two ranks (multiproc, gloo): the base model's tokens, and with an adapter (A or B sharded) peft's."""
        from weavelm import LLM, LoRARequest

        adapter = request.getfixturevalue("adapter") if self.lora_target_modules else None
        lora = {"lora": {"max_loras": 1, "max_lora_rank": self.lora_rank}} if adapter else {}
        executor = {"name": "multiproc", "tensor_parallel_size": self.tensor_parallel_size}
        with LLM(model=checkpoint, executor=executor, **lora, **ENGINE) as llm:
            assert _generate(llm, self.max_tokens) == reference
            if adapter:
                assert _generate(llm, self.max_tokens, LoRARequest("contract", 1, adapter)) == \
                    _merged_reference(checkpoint, adapter, self.max_tokens)

    def test_ngram_speculation_keeps_greedy_tokens(self, checkpoint, reference):
        from weavelm import LLM

        with LLM(model=checkpoint, speculative=dict(self.speculative), **ENGINE) as llm:
            assert _generate(llm, self.max_tokens) == reference
            assert llm.get_stats().spec_num_draft_tokens > 0, "no draft was proposed; the test would prove nothing"


def _generate(llm, max_tokens: int, lora_request: Any = None) -> list[list[int]]:
    from weavelm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in PROMPTS], params,
                        lora_request=[lora_request] * len(PROMPTS))
    for out in outs:
        assert out.error is None, out.error
    return [o.outputs[0].token_ids for o in outs]


_MODELS: dict[str, Any] = {}


def _hf_model(path: str):
    from transformers import AutoModelForCausalLM

    if path not in _MODELS:
        _MODELS[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _MODELS[path]


def _hf_greedy(model, max_tokens: int) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
            out.append(ids[0, len(prompt):].tolist())
    return out


def _merged_reference(checkpoint: str, adapter: str, max_tokens: int) -> list[list[int]]:
    """transformers' greedy tokens with the adapter merged into the weights by peft."""
    key = os.path.join(adapter, "merged")
    if key not in _MODELS:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        _MODELS[key] = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    return _hf_greedy(_MODELS[key], max_tokens)
