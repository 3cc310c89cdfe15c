"""PEFT adapters for the tiny models, made by `peft` itself with non-zero B (`init_lora_weights=False`), and the
reference: transformers with the adapter merged by `merge_and_unload`."""

from __future__ import annotations

import os

import torch

from tests.model_fixtures import hf_greedy

# name -> (rank, alpha, target modules, rsLoRA)
ADAPTERS = {
    "attn4": (4, 8, ["q_proj", "v_proj"], False),
    "mlp8": (8, 16, ["o_proj", "gate_proj", "up_proj", "down_proj"], True),
    "mix16": (16, 24, ["q_proj", "k_proj", "down_proj", "embed_tokens", "lm_head"], False),
}


def build_adapter(base: str, path: str, rank: int, alpha: float, targets: list[str], rslora: bool, seed: int,
                  safe: bool = True, scale: float = 0.5) -> str:
    """Save a seeded random PEFT LoRA adapter for the model at `base` to `path` (once) and return it. `scale`
    shrinks the random weights so the adapted model stays a sensible (non-degenerate) model."""
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        return path
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, lora_dropout=0.0,
                     init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(scale)
    peft_model.save_pretrained(path, safe_serialization=safe)
    return path


def merged_greedy(base: str, adapter: str | None, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy tokens with the adapter merged by peft (the base model when `adapter` is None)."""
    if adapter is None:
        return hf_greedy(base, prompt_ids, max_new_tokens)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    with torch.no_grad():
        out = merged.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0, min_new_tokens=max_new_tokens)
    return out[0, len(prompt_ids):].tolist()
