"""Sliding-window attention (issue 25 #1): Mistral and Qwen2 past their window equal transformers, and the KV
cache holds only the blocks a window can still see.

The references are transformers' eager attention on the same tiny random weights (window 8, prompts and
generations well past it). fp32 on the CPU: greedy tokens must be identical, last-position logits within 1e-4.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.model_fixtures import VOCAB
from weavelm import LLM, SamplingParams
from weavelm.testing import prompt_logits

WINDOW = 8
PROMPTS = [list(range(10, 40)), [5, 17, 42, 99, 3, 250, 77, 12, 400, 8, 61, 6], list(range(300, 321))]
MAX_TOKENS = 24


def _config(arch: str):
    from transformers import MistralConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  initializer_range=0.3, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2, sliding_window=WINDOW)
    if arch == "mistral":
        return MistralConfig(**common)
    # layer 0 attends to everything, layer 1 to its window: per-layer windows (config.layer_types)
    return Qwen2Config(use_sliding_window=True, max_window_layers=1, **common)


def _hf(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """arch -> (path, transformers model, greedy references per prompt)."""
    from transformers import AutoModelForCausalLM

    out = {}
    for seed, arch in enumerate(("mistral", "qwen2_mixed")):
        path = str(tmp_path_factory.mktemp(arch))
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(_config(arch), dtype=torch.float32).save_pretrained(path)
        hf = _hf(path)
        refs = []
        with torch.no_grad():
            for p in PROMPTS:
                gen = hf.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                  eos_token_id=None, pad_token_id=0, min_new_tokens=MAX_TOKENS)
                refs.append(gen[0, len(p):].tolist())
        out[arch] = (path, hf, refs)
    return out


def _llm(path: str, attention: str = "torch_ref", **kw) -> LLM:
    return LLM(model=path, dtype="float32", device="cpu", loader="safetensors", attention=attention, **kw)


GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def test_the_window_changes_the_answer(models):
    """The references differ from full attention on the same weights, so the parity below tests the window."""
    path, hf, refs = models["mistral"]
    hf.config.sliding_window = None
    try:
        full = hf.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=MAX_TOKENS, do_sample=False,
                           eos_token_id=None, pad_token_id=0, min_new_tokens=MAX_TOKENS)[0, len(PROMPTS[0]):]
    finally:
        hf.config.sliding_window = WINDOW
    assert full.tolist() != refs[0]


@pytest.mark.parametrize("arch", ["mistral", "qwen2_mixed"])
@pytest.mark.parametrize("attention", ["torch_ref", "cpu"])
def test_greedy_past_the_window_matches_transformers(models, arch, attention):
    path, _, refs = models[arch]
    llm = _llm(path, attention, scheduler={"max_num_batched_tokens": 16})  # chunked prefill across the window
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == refs


@pytest.mark.parametrize("arch", ["mistral", "qwen2_mixed"])
def test_last_position_logits_match_transformers(models, arch):
    path, hf, _ = models[arch]
    llm = _llm(path, "cpu")
    for p in PROMPTS:
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0, -1].float()
        torch.testing.assert_close(prompt_logits(llm, p), ref, atol=1e-4, rtol=1e-4)
