"""Speculative decoding end to end on the tiny fixtures (fp32, CPU): greedy output is token-identical to decoding
without speculation, for `ngram` and `draft_model` (the target as its own draft: 100% acceptance; another random
model as draft), in mixed batches with chunked prefill, prefix caching and preemption forced by a small KV pool."""

import math

import pytest

from tests.model_fixtures import ARCHS
from weavelm import LLM, SamplingParams
from weavelm.testing import StepRecorder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHARED = list(range(100, 116))
PROMPTS = [
    {"prompt_token_ids": [5, 6, 7, 8, 9] * 3},  # repetitive: n-gram lookup hits
    {"prompt_token_ids": [(i * 37) % 500 + 3 for i in range(60)]},  # longer than the step budget: chunked
    {"prompt_token_ids": SHARED + [20, 21, 22, 23]},  # these two share 4 blocks: prefix caching
    {"prompt_token_ids": SHARED + [30, 31, 32]},
    {"prompt_token_ids": [3, 4] * 6},
]
MAX_TOKENS = [24, 30, 17, 9, 28]
ENGINE = dict(dtype="float32", device="cpu", cache={"num_blocks": 26, "block_size": 4},
              scheduler={"max_num_batched_tokens": 32, "max_num_seqs": 8})


def _params() -> list[SamplingParams]:
    return [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in MAX_TOKENS]


def _run(model: str, speculative: dict | None):
    recorder = StepRecorder()
    llm = LLM(model=model, speculative=speculative, registry=recorder.registry(), **ENGINE)
    outs = llm.generate(PROMPTS, _params())
    return [o.outputs[0].token_ids for o in outs], llm.get_stats(), recorder.num_preempted


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_identity_with_every_proposer(tiny_models, arch):
    target = tiny_models[arch]
    other = tiny_models[ARCHS[(ARCHS.index(arch) + 1) % len(ARCHS)]]  # another architecture, same vocabulary
    ref, _, preempted = _run(target, None)
    assert preempted > 0, "the pool must be small enough to force preemption"
    assert [len(r) for r in ref] == MAX_TOKENS
    cases = {"ngram": {"name": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
                       "prompt_lookup_max": 3},
             "self_draft": {"name": "draft_model", "num_speculative_tokens": 3, "model": target},
             "other_draft": {"name": "draft_model", "num_speculative_tokens": 2, "model": other}}
    for case, spec in cases.items():
        got, stats, preempted = _run(target, spec)
        assert got == ref, case
        assert preempted > 0, case
        assert stats.spec_num_draft_tokens > 0, case
        assert stats.spec_proposer_time_s > 0, case
        if case == "self_draft":
            assert stats.spec_acceptance_rate == 1.0
            assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens
            assert stats.spec_mean_accepted_length > 2.5
        assert 0 <= stats.spec_acceptance_rate <= 1
        assert stats.num_used_blocks == 0  # every block (rolled back or not) went back to the pool


def test_stop_token_and_max_tokens_inside_an_accepted_run(tiny_llama):
    """With the target as its own draft every draft is accepted, so a stop token or max_tokens falls inside a
    run of k + 1 tokens: nothing after it is emitted."""
    prompt = [{"prompt_token_ids": [7, 8, 9, 10, 11]}]
    ref = LLM(model=tiny_llama, **ENGINE).generate(prompt, SamplingParams(max_tokens=20, temperature=0,
                                                                         ignore_eos=True))[0].outputs[0].token_ids
    stop = next(t for t in ref[3:] if ref.index(t) >= 3)  # first occurrence at index >= 3
    cut = ref.index(stop) + 1
    llm = LLM(model=tiny_llama, speculative={"name": "draft_model", "num_speculative_tokens": 4,
                                             "model": tiny_llama}, **ENGINE)
    out = llm.generate(prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                              stop_token_ids=[stop]))[0].outputs[0]
    assert out.token_ids == ref[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    for max_tokens in (1, 2, 6, 7):
        out = llm.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                  ignore_eos=True))[0].outputs[0]
        assert out.token_ids == ref[:max_tokens] and out.finish_reason == "length"
    assert llm.get_stats().spec_acceptance_rate == 1.0


def test_stop_string_inside_an_accepted_run(smol_tokenizer_model):
    prompt = "The quick brown fox jumps over"
    engine = dict(dtype="float32", device="cpu", cache={"num_blocks": 64, "block_size": 4})
    base = LLM(model=smol_tokenizer_model, **engine)
    ref = base.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].outputs[0]
    stop = ref.text[len(ref.text) // 2:len(ref.text) // 2 + 3]
    assert stop.strip(), ref.text
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
    want = base.generate([prompt], params)[0].outputs[0]
    llm = LLM(model=smol_tokenizer_model, speculative={"name": "draft_model", "num_speculative_tokens": 4,
                                                       "model": smol_tokenizer_model}, **engine)
    got = llm.generate([prompt], params)[0].outputs[0]
    assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == \
        (want.text, want.token_ids, "stop", stop)
    assert len(got.token_ids) < 24


def test_sampling_distribution_end_to_end(tiny_models):
    """Seeded sampling with a different random draft (the tiny Qwen2 for the tiny Llama): the (second, third)
    generated token pairs of 1,200 requests with speculation follow the same distribution as without it, and seeded
    runs reproduce exactly. With top_k=3 the pairs fall in <= 81 cells (about 25 in practice); the bound is 2.5x the
    total variation two independent samples of this size show in expectation, 0.5 * sum_i sqrt(4 p_i (1 - p_i) /
    (pi N)) over the pooled frequencies p (about 0.07 here; at 300 requests two plain runs with other seeds already
    differed by 0.13-0.18)."""
    import collections

    prompt = {"prompt_token_ids": [7, 8, 9, 10, 11]}
    params = [SamplingParams(max_tokens=3, temperature=1.0, top_k=3, seed=1000 + i, ignore_eos=True)
              for i in range(1200)]
    engine = dict(dtype="float32", device="cpu", cache={"num_blocks": 512, "block_size": 4},
                  scheduler={"max_num_seqs": 128})

    def pairs(llm) -> list[tuple[int, int]]:
        return [tuple(o.outputs[0].token_ids[1:3]) for o in llm.generate([prompt] * len(params), params)]

    tiny_llama = tiny_models["llama"]
    base = pairs(LLM(model=tiny_llama, **engine))
    spec_llm = LLM(model=tiny_llama, speculative={"name": "draft_model", "num_speculative_tokens": 2,
                                                  "model": tiny_models["qwen2"]}, **engine)
    spec = pairs(spec_llm)
    assert pairs(spec_llm) == spec  # per-request seeds: reproducible
    a, b = collections.Counter(base), collections.Counter(spec)
    n = len(params)
    tv = 0.5 * sum(abs(a[k] - b[k]) for k in set(a) | set(b)) / n
    pooled = [(a[k] + b[k]) / (2 * n) for k in set(a) | set(b)]
    expected = 0.5 * sum(math.sqrt(4 * p * (1 - p) / (math.pi * n)) for p in pooled)
    assert tv < 2.5 * expected, (tv, expected, a, b)
    assert spec_llm.get_stats().spec_num_draft_tokens > 0


def test_logprobs_and_logits_processors_with_speculation(tiny_llama):
    """Logprobs come for every accepted token (as without speculation); a request using a logits processor
    (penalties, bias, bad words, min_tokens) is never given drafts and decodes exactly as before."""
    prompt = [{"prompt_token_ids": [7, 8, 9, 10, 11, 7, 8, 9]}]
    cases = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2),
             SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=1.5)]
    base = LLM(model=tiny_llama, **ENGINE)
    spec = LLM(model=tiny_llama, speculative={"name": "draft_model", "num_speculative_tokens": 3,
                                              "model": tiny_llama}, **ENGINE)
    for params in cases:
        want = base.generate(prompt, params)[0].outputs[0]
        before = spec.get_stats().spec_num_draft_tokens
        got = spec.generate(prompt, params)[0].outputs[0]
        assert got.token_ids == want.token_ids
        if params.logprobs:
            assert spec.get_stats().spec_num_draft_tokens > before
            assert len(got.logprobs) == len(want.logprobs) == 12
            for g, w in zip(got.logprobs, want.logprobs):
                assert list(g) == list(w)
                assert all(abs(g[t] - w[t]) < 1e-4 and g[t].rank == w[t].rank for t in g)
        else:
            assert spec.get_stats().spec_num_draft_tokens == before


def test_lora_requests_with_speculation(tiny_llama, tmp_path):
    """Adapters (one with an lm_head target) keep their greedy output under speculation; the draft runs without
    adapters, so only acceptance can suffer."""
    pytest.importorskip("peft")
    from tests.lora_fixtures import ADAPTERS, build_adapter
    from weavelm import LoRARequest

    loras = [LoRARequest(name, i + 1, build_adapter(tiny_llama, str(tmp_path / name), *spec, seed=i))
             for i, (name, spec) in enumerate(ADAPTERS.items())] + [None]
    prompts = [{"prompt_token_ids": [5, 6, 7, 8, 9] * 3}] * len(loras)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    engine = dict(dtype="float32", device="cpu", cache={"num_blocks": 64, "block_size": 4},
                  lora={"max_loras": 3, "max_lora_rank": 16})
    want = [o.outputs[0].token_ids for o in LLM(model=tiny_llama, **engine).generate(prompts, params,
                                                                                   lora_request=loras)]
    assert len({tuple(w) for w in want}) == len(want), "the adapters must change the output"
    for spec in ({"name": "ngram", "num_speculative_tokens": 3},
                 {"name": "draft_model", "num_speculative_tokens": 3, "model": tiny_llama}):
        llm = LLM(model=tiny_llama, speculative=spec, **engine)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, lora_request=loras)]
        assert got == want, spec["name"]
        assert llm.get_stats().spec_num_draft_tokens > 0
