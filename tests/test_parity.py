"""Greedy output is token-for-token identical to transformers (fp32, CPU) for tiny Llama, Qwen2 and Qwen3."""

import pytest

from tests.model_fixtures import ARCHS, hf_greedy, hf_logits
from weavelm import LLM, SamplingParams

PROMPTS = [[5, 17, 42, 99, 3], list(range(10, 40)), [7], list(range(100, 163)), [300, 301, 302, 9, 8],
           list(range(200, 213)), [44] * 20, list(range(400, 497))]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def references(tiny_models):
    return {a: [hf_greedy(tiny_models[a], p, MAX_TOKENS) for p in PROMPTS] for a in ARCHS}


def make_llm(path, **kw):
    return LLM(model=path, dtype="float32", device="cpu", loader="safetensors", attention="torch_ref", **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_with_staggered_arrivals_matches_transformers(arch, tiny_models, references):
    llm = make_llm(tiny_models[arch], scheduler={"max_num_batched_tokens": 64})
    engine = llm.engine
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    results, pending = {}, list(enumerate(PROMPTS))
    steps = 0
    while pending or engine.has_unfinished_requests():
        if pending:  # one new request joins the running batch every step
            i, p = pending.pop(0)
            engine.add_request({"prompt_token_ids": p}, params, request_id=str(i))
        for out in engine.step():
            if out.finished:
                results[int(out.request_id)] = out.outputs[0].token_ids
        steps += 1
    assert steps > len(PROMPTS)
    for i in range(len(PROMPTS)):
        assert results[i] == references[arch][i], f"prompt {i}"


@pytest.mark.parametrize("arch", ARCHS)
def test_each_prompt_alone_matches_transformers(arch, tiny_models, references):
    llm = make_llm(tiny_models[arch])
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        out = llm.generate([{"prompt_token_ids": p}], params)[0]
        assert out.outputs[0].token_ids == references[arch][i]
        assert out.outputs[0].finish_reason == "length"


def test_prefill_logits_within_tolerance(tiny_models):
    """The engine's last-position logits equal transformers' to fp32 rounding (atol 1e-4)."""
    import torch

    from weavelm.testing import prompt_logits

    path = tiny_models["qwen3"]
    llm = make_llm(path)
    for p in PROMPTS[:3]:
        ours = prompt_logits(llm, p)
        ref = hf_logits(path, p)[-1]
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
