"""Sampler behaviour: seeds independent of batch, top-k/top-p/min-p, logprobs, stop conditions."""

import math

import pytest
import torch

from tests.model_fixtures import hf_logits
from weavelm import LLM, SamplingParams
from weavelm.sample.sampler import SamplingMetadata, apply_top_k_top_p_min_p


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(model=tiny_llama, dtype="float32", device="cpu", loader="safetensors")


def ids(p):
    return {"prompt_token_ids": p}


def test_seeded_sampling_independent_of_batch(llm):
    target = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    alone = llm.generate([ids([5, 6, 7])], target)[0].outputs[0].token_ids
    others = [SamplingParams(max_tokens=n, temperature=0.8, ignore_eos=True) for n in (3, 20, 7)]
    batch = llm.generate([ids([9, 9]), ids([5, 6, 7]), ids(list(range(30))), ids([1, 2, 3, 4])],
                         [others[0], target, others[1], others[2]])
    assert batch[1].outputs[0].token_ids == alone
    again = llm.generate([ids(list(range(50, 90))), ids([5, 6, 7])], [others[1], target])
    assert again[1].outputs[0].token_ids == alone
    different = llm.generate([ids([5, 6, 7])], SamplingParams(max_tokens=12, temperature=1.0, seed=99,
                                                              ignore_eos=True))[0]
    assert different.outputs[0].token_ids != alone


def test_top_k_one_and_tiny_top_p_are_greedy(llm):
    greedy = llm.generate([ids([3, 4, 5])], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    for sp in (SamplingParams(max_tokens=8, temperature=1.5, top_k=1, ignore_eos=True),
               SamplingParams(max_tokens=8, temperature=1.5, top_p=1e-6, ignore_eos=True),
               SamplingParams(max_tokens=8, temperature=1.5, min_p=1.0, ignore_eos=True)):
        out = llm.generate([ids([3, 4, 5])], sp)[0]
        assert out.outputs[0].token_ids == greedy.outputs[0].token_ids


def test_filters_keep_exactly_the_right_sets():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]] * 3)
    probs = logits[0].softmax(-1)
    m = SamplingMetadata(torch.ones(3), torch.tensor([2, 0, 0]), torch.tensor([1.0, float(probs[:2].sum()) + 1e-4,
                                                                                1.0]),
                         torch.tensor([0.0, 0.0, float(probs[2] / probs[0]) - 1e-4]), False, True, True, True, {},
                         False)
    out = apply_top_k_top_p_min_p(logits, m)
    kept = torch.isfinite(out)
    assert kept[0].tolist() == [True, True, False, False, False]
    assert kept[1].tolist() == [True, True, True, False, False]
    assert kept[2].tolist() == [True, True, True, False, False]


def test_logprobs_of_sampled_tokens(llm, tiny_llama):
    prompt = [11, 12, 13, 14]
    out = llm.generate([ids(prompt)], SamplingParams(max_tokens=3, temperature=0, logprobs=True,
                                                     ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 3
    ref = hf_logits(tiny_llama, prompt + out.token_ids[:2]).log_softmax(-1)
    for j, tok in enumerate(out.token_ids):
        assert math.isclose(out.logprobs[j][tok], ref[len(prompt) - 1 + j, tok].item(), abs_tol=1e-4)


def test_stop_token_ids_and_max_tokens(llm):
    free = llm.generate([ids([8, 9])], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    toks = free.outputs[0].token_ids
    stop_at = toks[4]
    out = llm.generate([ids([8, 9])], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at],
                                                     ignore_eos=True))[0].outputs[0]
    assert out.token_ids == toks[: toks.index(stop_at) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    assert free.outputs[0].finish_reason == "length" and len(toks) == 10


def test_eos_stops_unless_ignored(tiny_llama):
    llm = LLM(model=tiny_llama, dtype="float32", device="cpu", loader="safetensors")
    toks = llm.generate([ids([8, 9])], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    first = toks.outputs[0].token_ids[2]
    llm.engine.processor.eos_token_id = first  # what the tokenizer would name as its eos
    out = llm.generate([ids([8, 9])], SamplingParams(max_tokens=10, temperature=0))[0].outputs[0]
    assert out.token_ids[-1] == first and out.finish_reason == "stop"
    out = llm.generate([ids([8, 9])], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 10
