"""Issue 15, deliverable 6: vLLM's sampling fields. Penalties against transformers' logits processors (or vLLM's
stated formula) on the same logits and end to end against transformers' generate; min_tokens, logit_bias,
bad_words; top-N and prompt logprobs against transformers' log_softmax; n with seeds; chat on lists; defaults
from generation_config.json."""

import json
import math
import shutil

import pytest
import torch

from tests.model_fixtures import _hf_model, hf_logits
from weavelm import LLM, RequestError, SamplingParams
from weavelm.sample.sampler import (PenaltyMetadata, SamplingMetadata, SparseLogits, apply_logits_processors,
                                             apply_penalties)

PROMPT = [5, 6, 7, 8, 9, 10, 5, 6]
EOS = 2


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(model=tiny_llama, dtype="float32", device="cpu", loader="safetensors", max_model_len=128)


def ids(tokens):
    return {"prompt_token_ids": list(tokens)}


def penalty_metadata(histories, n_prompt, presence, frequency, repetition, vocab):
    width = max(map(len, histories))
    tok = torch.full((len(histories), width), vocab)
    is_out = torch.zeros(len(histories), width, dtype=torch.bool)
    for i, h in enumerate(histories):
        tok[i, :len(h)] = torch.tensor(h)
        is_out[i, n_prompt[i]:len(h)] = True
    f = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
    return PenaltyMetadata(torch.arange(len(histories)), f(presence), f(frequency), f(repetition), tok, is_out)


# -- processors on the same logits ---------------------------------------------------------------------------------
def test_repetition_penalty_equals_transformers_processor():
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    vocab, hist = 50, [[3, 7, 7, 1, 9], [0, 0, 49, 12]]
    logits = torch.randn(2, vocab) * 3
    for penalty in (1.3, 0.7):
        ours = logits.clone()
        apply_penalties(ours, penalty_metadata(hist, [2, 1], [0, 0], [0, 0], [penalty, penalty], vocab))
        for row in range(2):
            ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([hist[row]]), logits[row:row + 1].clone())
            torch.testing.assert_close(ours[row], ref[0])


def test_presence_and_frequency_follow_vllm_formula_on_output_tokens_only():
    torch.manual_seed(1)
    vocab, hist, n_prompt = 40, [[4, 4, 5, 6, 6, 6, 9]], [2]  # prompt [4, 4]; output [5, 6, 6, 6, 9]
    logits = torch.randn(1, vocab)
    ours = logits.clone()
    apply_penalties(ours, penalty_metadata(hist, n_prompt, [0.5], [0.25], [1.0], vocab))
    ref = logits.clone()[0]
    output = hist[0][n_prompt[0]:]
    for t in set(output):  # logit -= frequency * count + presence * (count > 0)
        ref[t] -= 0.25 * output.count(t) + 0.5
    torch.testing.assert_close(ours[0], ref)
    assert ours[0, 4] == logits[0, 4]  # a prompt-only token is untouched by presence / frequency


def test_logit_bias_and_bans_equal_transformers_processors():
    from transformers import NoBadWordsLogitsProcessor, SequenceBiasLogitsProcessor

    torch.manual_seed(2)
    logits = torch.randn(2, 30)
    m = SamplingMetadata(*([torch.empty(0)] * 4), True, False, False, False, {}, False,
                         logit_bias=SparseLogits(torch.tensor([0, 1]), torch.tensor([3, 8]), torch.tensor([5.0, -2.5])),
                         banned=SparseLogits(torch.tensor([1]), torch.tensor([11])))
    ours = apply_logits_processors(logits, m)
    bias0 = SequenceBiasLogitsProcessor({(3,): 5.0})(torch.tensor([[1]]), logits[:1].clone())
    torch.testing.assert_close(ours[0], bias0[0])
    ref1 = SequenceBiasLogitsProcessor({(8,): -2.5})(torch.tensor([[1]]), logits[1:].clone())
    ref1 = NoBadWordsLogitsProcessor([[11]], eos_token_id=EOS)(torch.tensor([[1]]), ref1)
    torch.testing.assert_close(ours[1], ref1[0])
    assert apply_logits_processors(logits, SamplingMetadata(*([torch.empty(0)] * 4), True, False, False, False, {},
                                                            False)) is logits  # nothing to do: no copy


# -- end to end against transformers' generate ---------------------------------------------------------------------
@pytest.mark.parametrize("penalty", [1.5, 0.8])
def test_greedy_repetition_penalty_equals_transformers_generate(llm, tiny_llama, penalty):
    out = llm.generate([ids(PROMPT)], SamplingParams(max_tokens=10, temperature=0, repetition_penalty=penalty,
                                                     ignore_eos=True))[0].outputs[0].token_ids
    with torch.no_grad():
        ref = _hf_model(tiny_llama).generate(torch.tensor([PROMPT]), max_new_tokens=10, do_sample=False,
                                             repetition_penalty=penalty, eos_token_id=None, pad_token_id=0)
    assert out == ref[0, len(PROMPT):].tolist()


def test_greedy_presence_frequency_equal_formula_step_by_step(llm, tiny_llama):
    sp = SamplingParams(max_tokens=8, temperature=0, presence_penalty=1.5, frequency_penalty=0.7, ignore_eos=True)
    out = llm.generate([ids(PROMPT)], sp)[0].outputs[0].token_ids
    assert out != llm.generate([ids(PROMPT)], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
                               )[0].outputs[0].token_ids  # the penalties change this output
    logits = hf_logits(tiny_llama, PROMPT + out[:-1])
    for j, tok in enumerate(out):
        row = logits[len(PROMPT) - 1 + j].clone()
        for t in set(out[:j]):
            row[t] -= 0.7 * out[:j].count(t) + 1.5
        assert tok == int(row.argmax())


def test_min_tokens_masks_eos_and_stop_ids(llm):
    forced_eos = {EOS: 100.0, 9: 50.0}
    early = llm.generate([ids(PROMPT)], SamplingParams(max_tokens=10, temperature=0, logit_bias=forced_eos))[0]
    assert early.outputs[0].token_ids == [EOS]
    sp = SamplingParams(max_tokens=10, temperature=0, logit_bias=forced_eos, min_tokens=3, stop_token_ids=[9])
    out = llm.generate([ids(PROMPT)], sp)[0].outputs[0]
    assert len(out.token_ids) == 4 and out.token_ids[-1] == EOS and out.finish_reason == "stop"
    assert EOS not in out.token_ids[:3] and 9 not in out.token_ids[:3]


def test_logit_bias_forces_a_token_and_rejects_unknown_ids(llm):
    out = llm.generate([ids(PROMPT)], SamplingParams(max_tokens=5, temperature=0.8, seed=3, ignore_eos=True,
                                                     logit_bias={77: 100}))[0]
    assert out.outputs[0].token_ids == [77] * 5
    bad = llm.generate([ids(PROMPT)], SamplingParams(logit_bias={512: 1.0}))[0]
    assert "SamplingParams.logit_bias: token id(s) [512] outside the vocabulary [0, 512)" in bad.error


def test_bad_words_are_never_generated(smol_tokenizer_model):
    llm = LLM(model=smol_tokenizer_model, dtype="float32", device="cpu", loader="safetensors", max_model_len=64)
    base = llm.generate(["The capital"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    tok = llm.get_tokenizer()
    word = tok.decode(base.outputs[0].token_ids[1:3])
    sp = llm.engine.prepare("The capital", SamplingParams(bad_words=[word]))[2]
    banned = sp.bad_words_token_ids
    assert banned and all(0 < len(seq) <= 3 for seq in banned)
    out = llm.generate(["The capital"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                       bad_words=[word]))[0].outputs[0].token_ids
    for seq in banned:
        assert not any(out[i:i + len(seq)] == seq for i in range(len(out)))
    assert out != base.outputs[0].token_ids


def test_seeded_penalties_are_batch_independent(llm):
    sp = SamplingParams(max_tokens=6, temperature=1.0, seed=11, repetition_penalty=1.4, presence_penalty=0.5,
                        min_tokens=2, logit_bias={3: 2.0}, ignore_eos=True)
    alone = llm.generate([ids(PROMPT)], sp)[0].outputs[0].token_ids
    mixed = llm.generate([ids([9, 9, 9]), ids(PROMPT), ids([4])],
                         [SamplingParams(max_tokens=3, temperature=0), sp, SamplingParams(max_tokens=9, seed=1)])
    assert mixed[1].outputs[0].token_ids == alone


# -- logprobs ------------------------------------------------------------------------------------------------------
def test_top_n_logprobs_match_log_softmax(llm, tiny_llama):
    out = llm.generate([ids(PROMPT)], SamplingParams(max_tokens=4, temperature=1.0, seed=5, logprobs=3,
                                                     ignore_eos=True))[0].outputs[0]
    ref = hf_logits(tiny_llama, PROMPT + out.token_ids[:-1]).log_softmax(-1)
    assert len(out.logprobs) == 4
    for j, (tok, d) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(PROMPT) - 1 + j]
        top = row.topk(3)
        assert list(d)[0] == tok and set(top.indices.tolist()) <= set(d) and len(d) in (3, 4)
        for t, lp in d.items():
            assert math.isclose(lp, row[t].item(), abs_tol=1e-4) and lp.logprob == float(lp)
            assert int((row > row[t] + 1e-4).sum()) + 1 <= lp.rank <= int((row >= row[t] - 1e-4).sum())
        assert [d[t].rank for t in top.indices.tolist()] == [1, 2, 3]


def test_logprobs_zero_and_true_give_the_sampled_token_only(llm):
    for value in (0, True):
        out = llm.generate([ids(PROMPT)], SamplingParams(max_tokens=3, temperature=0, logprobs=value,
                                                         ignore_eos=True))[0].outputs[0]
        assert [list(d) for d in out.logprobs] == [[t] for t in out.token_ids]
        assert all(d[t].rank == 1 for d, t in zip(out.logprobs, out.token_ids))  # greedy picks rank 1
    assert llm.generate([ids(PROMPT)], SamplingParams(max_tokens=2, logprobs=False))[0].outputs[0].logprobs is None


def test_prompt_logprobs_match_transformers_with_chunks_and_cached_prefix(tiny_llama):
    llm = LLM(model=tiny_llama, dtype="float32", device="cpu", loader="safetensors", max_model_len=128,
              max_num_batched_tokens=8, block_size=4)
    prompt = list(range(20, 39))
    llm.generate([ids(prompt)], SamplingParams(max_tokens=1))  # fills the prefix cache
    out = llm.generate([ids(prompt)], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2))[0]
    ref = hf_logits(tiny_llama, prompt).log_softmax(-1)
    plp = out.prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None
    for j in range(1, len(prompt)):
        d = plp[j]
        assert list(d)[0] == prompt[j] and math.isclose(d[prompt[j]], ref[j - 1, prompt[j]].item(), abs_tol=1e-4)
        assert set(ref[j - 1].topk(2).indices.tolist()) <= set(d)
    assert out.num_cached_tokens == 0  # prompt logprobs need every position: no prefix-cache hits


# -- n -------------------------------------------------------------------------------------------------------------
def test_n_seeded_completions_differ_and_reproduce(llm):
    sp = SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=42, ignore_eos=True)
    a, b = llm.generate([ids(PROMPT)], sp)[0], llm.generate([ids(PROMPT)], sp)[0]
    assert [c.index for c in a.outputs] == [0, 1, 2] and a.finished
    texts = [tuple(c.token_ids) for c in a.outputs]
    assert len(set(texts)) == 3 and texts == [tuple(c.token_ids) for c in b.outputs]
    for i in range(3):  # child i is the n=1 request with seed 42 + i
        single = llm.generate([ids(PROMPT)], SamplingParams(max_tokens=8, temperature=1.0, seed=42 + i,
                                                            ignore_eos=True))[0]
        assert single.outputs[0].token_ids == list(texts[i])
    streamed = list(llm.stream(ids(PROMPT), sp))
    assert streamed[-1].finished and [c.token_ids for c in streamed[-1].outputs] == [list(t) for t in texts]
    assert all(o.request_id == streamed[0].request_id for o in streamed)
    assert not llm.engine.output_processor.states and not llm.engine.output_processor.parents


def test_n_abort_by_parent_id_frees_every_child(llm):
    rid = llm.engine.add_request(ids(PROMPT), SamplingParams(n=2, max_tokens=50, ignore_eos=True))
    llm.engine.step()
    llm.engine.abort_request(rid)
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert not llm.engine.output_processor.parents and llm.get_stats().num_used_blocks == 0


# -- validation ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,field", [
    ({"n": 0}, "n"), ({"n": 2.0}, "n"), ({"n": 129}, "n"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": math.nan}, "frequency_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": "1"}, "repetition_penalty"), ({"min_tokens": 17}, "min_tokens"),
    ({"min_tokens": -1}, "min_tokens"), ({"logit_bias": {1: 101}}, "logit_bias"),
    ({"logit_bias": {"1": 1.0}}, "logit_bias"), ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"logit_bias": {-1: 0.0}}, "logit_bias"), ({"bad_words": "word"}, "bad_words"), ({"bad_words": [""]}, "bad_words"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"), ({"prompt_logprobs": True}, "prompt_logprobs"),
    ({"logprobs": 21}, "logprobs")])
def test_new_fields_are_validated_strictly(kwargs, field):
    with pytest.raises(RequestError, match=rf"^SamplingParams\.{field}: .* \(got "):
        SamplingParams(**kwargs)


def test_engine_revalidates_fields_set_after_construction(llm):
    sp = SamplingParams(max_tokens=4)
    sp.min_tokens = 9
    out = llm.generate([ids(PROMPT)], sp)[0]
    assert out.error.startswith("SamplingParams.min_tokens:")


# -- chat and defaults ---------------------------------------------------------------------------------------------
def test_chat_takes_one_conversation_or_a_list(smol_tokenizer_model):
    llm = LLM(model=smol_tokenizer_model, dtype="float32", device="cpu", loader="safetensors", max_model_len=128)
    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    one = llm.chat([{"role": "user", "content": "Hi"}], sp)
    many = llm.chat([[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Bye"}]], sp)
    assert len(one) == 1 and len(many) == 2
    assert many[0].outputs[0].token_ids == one[0].outputs[0].token_ids and "Bye" in many[1].prompt
    with pytest.raises(RequestError, match="messages: expected a conversation"):
        llm.chat("Hi", sp)
    with pytest.raises(RequestError, match="messages: expected a conversation"):
        llm.chat([[{"content": "no role"}]], sp)


def test_default_sampling_params_from_generation_config(tiny_llama, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_llama, model)
    (model / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
         "max_new_tokens": 7, "do_sample": True, "eos_token_id": EOS}))
    llm = LLM(model=str(model), dtype="float32", device="cpu", loader="safetensors")
    sp = llm.get_default_sampling_params()
    assert (sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.repetition_penalty, sp.max_tokens) == \
        (0.6, 0.9, 20, 0.05, 1.1, 7)
    assert len(llm.generate([ids([4, 5])])[0].outputs[0].token_ids) <= 7  # used when none are given
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS}))
    plain = LLM(model=str(model), dtype="float32", device="cpu", loader="safetensors")
    assert plain.get_default_sampling_params() == SamplingParams()
