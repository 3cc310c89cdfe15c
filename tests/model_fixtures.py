"""Tiny models of real architectures, made by transformers from a seed (the reference side of every parity test)."""

from __future__ import annotations

import os

import torch

ARCHS = ("llama", "qwen2", "qwen3")
VOCAB = 512
# Tensor-parallel fixtures: name -> (architecture, config overrides). Besides the three architectures (4 heads, 2 KV
# heads): one KV head (MQA, replicated on every rank) and tied embeddings (the LM head is the embedding's shard).
TP_FIXTURES = {"llama": ("llama", {}), "qwen2": ("qwen2", {}), "qwen3": ("qwen3", {}),
               "llama_mqa": ("llama", {"num_key_value_heads": 1}),
               "qwen2_tied": ("qwen2", {"tie_word_embeddings": True})}


def tiny_config(arch: str, **kw):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.3, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2)
    common.update(kw)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=16, **common)
    raise ValueError(arch)


def build_tiny_model(arch: str, path: str, seed: int = 0, **kw) -> str:
    """Save a seeded random model to `path` (once) and return it."""
    from transformers import AutoModelForCausalLM

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw), dtype=torch.float32)
    model.save_pretrained(path)
    return path


def hf_greedy(path: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:

    model = _hf_model(path)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0, min_new_tokens=max_new_tokens)
    return out[0, len(prompt_ids):].tolist()


_CACHE: dict[str, object] = {}


def _hf_model(path: str):
    from transformers import AutoModelForCausalLM

    if path not in _CACHE:
        _CACHE[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _CACHE[path]


def hf_logits(path: str, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return _hf_model(path)(torch.tensor([token_ids])).logits[0].float()
