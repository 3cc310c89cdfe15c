"""Issue 10: a bad request never takes down its batch or the engine, and streams never hang.

Every example of classes 1, 2, 3, 4 and 6 of the issue: the typed error (or the right behaviour), the good
requests of the same call give their solo outputs, and the engine serves the next call normally."""

import gc
import math
import threading

import pytest

from weavelm import LLM, RequestError, SamplingParams, WeaveError
from weavelm.core.llm_engine import EngineStats

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
GOOD = [[3, 4, 5], [7, 8], [11, 12, 13, 14]]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here steps a tiny model: run torch on one thread (see conftest)."""


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(model=tiny_llama, dtype="float32", device="cpu", loader="safetensors", max_model_len=128)


@pytest.fixture(scope="module")
def solo(llm):
    cache = {}

    def run(ids, params=GREEDY):
        key = (tuple(ids), repr(params))
        if key not in cache:
            cache[key] = llm.generate([{"prompt_token_ids": list(ids)}], params)[0].outputs[0].token_ids
        return cache[key]
    return run


def assert_clean(llm):
    """No request left behind in the frontend or the core, and every KV block back in the pool."""
    assert not llm.engine.has_unfinished_requests()
    stats = llm.get_stats()
    assert stats.num_running_reqs == 0 and stats.num_waiting_reqs == 0 and stats.num_used_blocks == 0


def check_mixed_call(llm, solo, bad_prompt, bad_params, field):
    """One call mixing good requests with a bad one: the bad one is an error output naming `field`, the good
    ones give their solo outputs, nothing is left behind and the next call works."""
    prompts = [{"prompt_token_ids": GOOD[0]}, bad_prompt, {"prompt_token_ids": GOOD[1]}]
    outs = llm.generate(prompts, [GREEDY, bad_params, GREEDY])
    assert outs[1].error and field in outs[1].error and outs[1].outputs[0].finish_reason == "error"
    assert outs[0].error is None and outs[0].outputs[0].token_ids == solo(GOOD[0])
    assert outs[2].error is None and outs[2].outputs[0].token_ids == solo(GOOD[1])
    assert_clean(llm)
    assert llm.generate([{"prompt_token_ids": GOOD[2]}], GREEDY)[0].outputs[0].token_ids == solo(GOOD[2])


def mutated(**fields):
    """SamplingParams that passed validation and were then changed: the engine validates again at submission."""
    sp = SamplingParams(max_tokens=6, temperature=0.8, ignore_eos=True)
    for k, v in fields.items():
        setattr(sp, k, v)
    return sp


# -- class 1: values that used to poison the step ----------------------------------------------------------------
@pytest.mark.parametrize("seed", ["abc", 1.5, 2**64, -2**63 - 1, True, [1]])
def test_bad_seed_rejected(seed):
    with pytest.raises(RequestError, match=r"SamplingParams\.seed: must be None or an integer in \[-2\*\*63, "
                                           r"2\*\*63-1\] \(got "):
        SamplingParams(seed=seed, temperature=0.8)


@pytest.mark.parametrize("seed", ["abc", 1.5, 2**64, -2**63 - 1])
def test_bad_seed_in_a_batch(llm, solo, seed):
    check_mixed_call(llm, solo, {"prompt_token_ids": [9, 9, 9]}, mutated(seed=seed), "SamplingParams.seed")


@pytest.mark.parametrize("seed", [2**63 - 1, -2**63, 0])
def test_extreme_seeds_run_and_reproduce(llm, seed):
    sp = SamplingParams(max_tokens=5, temperature=0.8, seed=seed, ignore_eos=True)
    first = llm.generate([{"prompt_token_ids": [5, 6, 7]}], sp)[0]
    again = llm.generate([{"prompt_token_ids": [5, 6, 7]}], sp)[0]
    assert first.error is None and len(first.outputs[0].token_ids) == 5
    assert first.outputs[0].token_ids == again.outputs[0].token_ids


@pytest.mark.parametrize("top_k", [2**63, 2**31, 1e300, float("inf")])
def test_huge_top_k_rejected(top_k):
    with pytest.raises(RequestError, match=r"SamplingParams\.top_k: must be an integer in \[0, 2\*\*31-1\]"):
        SamplingParams(top_k=top_k)


def test_huge_top_k_in_a_batch(llm, solo):
    check_mixed_call(llm, solo, {"prompt_token_ids": [9, 9, 9]}, mutated(top_k=2**63), "SamplingParams.top_k")


def test_largest_top_k_runs_like_no_top_k(llm):
    base = dict(max_tokens=6, temperature=0.9, seed=3, ignore_eos=True)
    off = llm.generate([[5, 6, 7]], SamplingParams(**base))[0].outputs[0].token_ids
    assert llm.generate([[5, 6, 7]], SamplingParams(top_k=2**31 - 1, **base))[0].outputs[0].token_ids == off


@pytest.mark.parametrize("priority", ["high", "1", 1.0, True, 2**63, None])
def test_bad_priority_rejected(priority):
    with pytest.raises(RequestError, match=r"SamplingParams\.priority: must be an integer"):
        SamplingParams(priority=priority)


def test_string_priority_under_priority_scheduler(tiny_llama):
    llm = LLM(model=tiny_llama, dtype="float32", device="cpu", loader="safetensors", max_model_len=128,
              scheduler="priority")
    solo = {i: llm.generate([{"prompt_token_ids": p}], GREEDY)[0].outputs[0].token_ids for i, p in enumerate(GOOD)}
    check_mixed_call(llm, lambda ids: solo[GOOD.index(ids)], {"prompt_token_ids": [9, 9]},
                     mutated(priority="high"), "SamplingParams.priority")
    prio = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, priority=p) for p in (2**63 - 1, -2**63)]
    outs = llm.generate([{"prompt_token_ids": GOOD[0]}, {"prompt_token_ids": GOOD[1]}], prio)
    assert [o.outputs[0].token_ids for o in outs] == [solo[0], solo[1]]


@pytest.fixture(scope="module")
def text_llm(smol_tokenizer_model):
    return LLM(model=smol_tokenizer_model, dtype="float32", device="cpu", loader="safetensors", max_model_len=128)


def test_float_prompt_token_ids_with_a_tokenizer(text_llm):
    solo = text_llm.generate(["Hello there"], GREEDY)[0]
    outs = text_llm.generate(["Hello there", {"prompt_token_ids": [1.0, 2.0]}, [3.5]], GREEDY)
    for bad in outs[1:]:
        assert bad.error and "prompt_token_ids: must be a list of integer token ids" in bad.error
    assert outs[0].outputs[0].token_ids == solo.outputs[0].token_ids and outs[0].outputs[0].text == solo.outputs[0].text
    assert_clean(text_llm)
    assert text_llm.generate(["Hello there"], GREEDY)[0].outputs[0].text == solo.outputs[0].text


# -- class 2: streams finish whoever consumes the outputs --------------------------------------------------------
def run_with_timeout(fn, timeout=60.0):
    result, errors = [], []

    def target():
        try:
            result.append(fn())
        except BaseException as e:  # surfaced in the test thread below
            errors.append(e)
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"did not finish within {timeout} s"
    if errors:
        raise errors[0]
    return result[0]


def stream_params(n=8):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def test_stream_interleaved_with_generate(llm, solo):
    def scenario():
        it = llm.stream({"prompt_token_ids": GOOD[0]}, stream_params())
        first = next(it)
        outs = llm.generate([{"prompt_token_ids": GOOD[1]}], stream_params())  # runs the stream's request too
        rest = list(it)
        return first, outs, rest
    first, outs, rest = run_with_timeout(scenario)
    assert not first.finished and rest[-1].finished and [r for r in rest if r.finished] == [rest[-1]]
    assert rest[-1].outputs[0].token_ids == solo(GOOD[0], stream_params())
    assert outs[0].outputs[0].token_ids == solo(GOOD[1], stream_params())
    assert_clean(llm)


def test_two_streams_interleaved(llm, solo):
    def scenario():
        a = llm.stream({"prompt_token_ids": GOOD[0]}, stream_params(5))
        b = llm.stream({"prompt_token_ids": GOOD[1]}, stream_params(9))
        seen = {"a": [], "b": []}
        live = {"a": a, "b": b}
        while live:
            for name, it in list(live.items()):
                out = next(it, None)
                if out is None:
                    del live[name]
                else:
                    seen[name].append(out)
        return seen
    seen = run_with_timeout(scenario)
    for name, ids, n in (("a", GOOD[0], 5), ("b", GOOD[1], 9)):
        outs = seen[name]
        assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished
        assert outs[-1].outputs[0].token_ids == solo(ids, stream_params(n))
        lens = [len(o.outputs[0].token_ids) for o in outs]
        assert lens == sorted(lens)
    assert_clean(llm)


def test_streams_and_generate_from_threads(llm, solo):
    results, errors = {}, []

    def streamer(i):
        try:
            results[f"s{i}"] = list(llm.stream({"prompt_token_ids": GOOD[i]}, stream_params(6 + i)))
        except BaseException as e:
            errors.append(e)

    def generator():
        try:
            results["g"] = llm.generate([{"prompt_token_ids": p} for p in GOOD], stream_params())
        except BaseException as e:
            errors.append(e)
    threads = [threading.Thread(target=streamer, args=(i,), daemon=True) for i in range(3)]
    threads.append(threading.Thread(target=generator, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads) and not errors
    for i in range(3):
        outs = results[f"s{i}"]
        assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished
        assert outs[-1].outputs[0].token_ids == solo(GOOD[i], stream_params(6 + i))
    assert [o.outputs[0].token_ids for o in results["g"]] == [solo(p, stream_params()) for p in GOOD]
    assert_clean(llm)


# -- class 3: an abandoned stream is aborted ---------------------------------------------------------------------
def long_stream(llm):
    return llm.stream({"prompt_token_ids": list(range(20, 60))}, stream_params(60))


def test_break_out_of_a_stream_aborts_it(llm, solo):
    for out in long_stream(llm):
        assert llm.get_stats().num_used_blocks > 0
        break
    assert_clean(llm)
    outs = llm.generate([{"prompt_token_ids": GOOD[0]}], GREEDY)
    assert outs[0].outputs[0].token_ids == solo(GOOD[0])
    assert_clean(llm)


def test_closed_stream_frees_its_blocks(llm):
    it = long_stream(llm)
    next(it)
    next(it)
    it.close()
    assert_clean(llm)


def test_garbage_collected_stream_is_aborted(llm):
    it = long_stream(llm)
    next(it)
    del it
    gc.collect()
    assert_clean(llm)


def test_abandoned_stream_does_not_run_in_the_next_call(llm, solo):
    it = long_stream(llm)
    rid = next(it).request_id
    del it
    outs = llm.generate([{"prompt_token_ids": GOOD[1]}], GREEDY)
    assert outs[0].outputs[0].token_ids == solo(GOOD[1])
    assert_clean(llm)


def test_llm_abort_ends_a_stream(llm):
    outs = []
    for out in long_stream(llm):
        outs.append(out)
        if len(outs) == 2:
            llm.abort(out.request_id)
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort" and len(outs) == 3
    llm.abort(["no-such-request", out.request_id])  # unknown and finished ids are ignored
    assert_clean(llm)


def test_abort_from_another_thread_while_stepping(tiny_llama):
    """An abort that arrives while another thread steps is applied before the next step; generate() then
    returns the aborted request's final output instead of waiting for it. The abort is sent from the runner's
    logits hook (`set_logits_hook`, reached with `collective_rpc`), i.e. from inside the third step."""
    calls = []

    def abort_from_another_thread(req_ids, logits):
        calls.append(1)
        if len(calls) == 3:
            t = threading.Thread(target=llm.abort, args=(req_ids[0],))
            t.start()
            t.join(10)
        return None

    with LLM(model=tiny_llama, dtype="float32", device="cpu", loader="safetensors", max_model_len=128) as llm:
        llm.collective_rpc("set_logits_hook", (abort_from_another_thread,))
        params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
        outs = run_with_timeout(lambda: llm.generate([{"prompt_token_ids": GOOD[0]}], params))
        out = outs[0].outputs[0]
        assert len(calls) >= 3 and out.finish_reason == "abort" and 0 < len(out.token_ids) < 50
        assert_clean(llm)


# -- class 4: wrong types give a RequestError, never a raw TypeError ---------------------------------------------
@pytest.mark.parametrize("prompt", [{"prompt_token_ids": ["a"]}, {"prompt_token_ids": "hello"},
                                    {"prompt_token_ids": None}, {"prompt_token_ids": [1.0, 2.0]},
                                    {"prompt_token_ids": [True, 2]}, {"prompt_token_ids": [[1, 2]]}])
def test_bad_prompt_token_ids(llm, solo, prompt):
    with pytest.raises(RequestError, match=r"prompt_token_ids: must be a list of integer token ids \(got "):
        llm.engine.add_request(prompt, GREEDY)
    check_mixed_call(llm, solo, prompt, GREEDY, "prompt_token_ids")


@pytest.mark.parametrize("prompt,message", [(None, "prompt: must be a str"), (3.5, "prompt: must be a str"),
                                            ({"prompt_token_ids": [1], "extra": 1}, "unknown key"),
                                            ({}, "needs `prompt` or `prompt_token_ids`"),
                                            ({"prompt": 5}, "prompt: must be a str")])
def test_bad_prompt_shapes(llm, solo, prompt, message):
    check_mixed_call(llm, solo, prompt, GREEDY, message)


def test_text_prompt_without_tokenizer(llm, solo):
    check_mixed_call(llm, solo, "hello", GREEDY, "this model has no tokenizer")


@pytest.mark.parametrize("kwargs,field", [({"stop": [5]}, "stop"), ({"stop": 5}, "stop"), ({"stop": [""]}, "stop"),
                                          ({"temperature": "0.7"}, "temperature"), ({"top_k": None}, "top_k"),
                                          ({"top_p": "1"}, "top_p"), ({"min_p": None}, "min_p"),
                                          ({"ignore_eos": 1}, "ignore_eos"), ({"max_tokens": "8"}, "max_tokens"),
                                          ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output")])
def test_wrong_types_are_request_errors(llm, solo, kwargs, field):
    with pytest.raises(RequestError, match=rf"SamplingParams\.{field}: .* \(got "):
        SamplingParams(**kwargs)
    check_mixed_call(llm, solo, {"prompt_token_ids": [9, 9]}, mutated(**kwargs), f"SamplingParams.{field}")


def test_sampling_params_of_the_wrong_kind(llm, solo):
    check_mixed_call(llm, solo, {"prompt_token_ids": [9]}, {"temperature": 0}, "sampling_params: expected")
    with pytest.raises(RequestError, match="sampling_params: 2 given for 3 prompts"):
        llm.generate([[1], [2], [3]], [GREEDY, GREEDY])
    with pytest.raises(RequestError, match="sampling_params: expected SamplingParams or a list"):
        llm.generate([[1]], "greedy")
    with pytest.raises(RequestError, match="prompts: expected a prompt or a list of prompts"):
        llm.generate(None)
    assert_clean(llm)


def test_stream_rejects_before_queueing(llm):
    with pytest.raises(RequestError, match="prompt_token_ids"):
        next(llm.stream({"prompt_token_ids": "hello"}))
    assert_clean(llm)


# -- class 6: numbers that used to be accepted or coerced --------------------------------------------------------
@pytest.mark.parametrize("temperature", [math.nan, math.inf, -math.inf, 1e-38, 1e-45, 1e-6, 1e7, 10**400, True])
def test_bad_temperatures(llm, solo, temperature):
    with pytest.raises(RequestError, match=r"SamplingParams\.temperature: must be 0 \(greedy\) or a number in "
                                           r"\[1e-05, 1e\+06\]"):
        SamplingParams(temperature=temperature)
    check_mixed_call(llm, solo, {"prompt_token_ids": [9, 9]}, mutated(temperature=temperature),
                     "SamplingParams.temperature")


def test_smallest_temperature_samples_like_greedy(llm, solo):
    out = llm.generate([{"prompt_token_ids": GOOD[2]}], SamplingParams(max_tokens=6, temperature=1e-5,
                                                                       ignore_eos=True))[0]
    assert out.outputs[0].token_ids == solo(GOOD[2])


@pytest.mark.parametrize("kwargs,field", [({"max_tokens": True}, "max_tokens"), ({"max_tokens": 8.0}, "max_tokens"),
                                          ({"max_tokens": 2**31}, "max_tokens"), ({"top_k": 2.5}, "top_k"),
                                          ({"stop_token_ids": "abc"}, "stop_token_ids"),
                                          ({"stop_token_ids": [1.0]}, "stop_token_ids"),
                                          ({"stop_token_ids": [-1]}, "stop_token_ids"),
                                          ({"logprobs": -1}, "logprobs"), ({"logprobs": 1.5}, "logprobs"),
                                          ({"top_p": math.nan}, "top_p"), ({"min_p": math.inf}, "min_p"),
                                          ({"top_p": True}, "top_p")])
def test_wrong_numbers_rejected(llm, solo, kwargs, field):
    with pytest.raises(RequestError, match=rf"SamplingParams\.{field}: .* \(got "):
        SamplingParams(**kwargs)
    check_mixed_call(llm, solo, {"prompt_token_ids": [9, 9]}, mutated(**kwargs), f"SamplingParams.{field}")


def test_error_message_names_field_value_and_rule():
    with pytest.raises(RequestError) as e:
        SamplingParams(max_tokens=True)
    assert str(e.value) == ("SamplingParams.max_tokens: must be an integer in [1, 2**31-1]; ask for at least one "
                            "token (got True)")
    with pytest.raises(RequestError, match=r"\(got <int>\)"):  # too long to print
        SamplingParams(seed=10**5000)


def test_accepted_values_are_normalised_not_coerced():
    import numpy as np

    sp = SamplingParams(max_tokens=np.int64(4), temperature=1, top_k=-1, seed=np.int32(7), stop="x",
                        stop_token_ids=(3, np.int64(4)), logprobs=2, priority=np.int64(-5))
    assert (sp.max_tokens, sp.temperature, sp.top_k, sp.seed, sp.stop, sp.stop_token_ids, sp.logprobs,
            sp.priority) == (4, 1.0, 0, 7, ["x"], [3, 4], 2, -5)
    assert type(sp.max_tokens) is int and type(sp.seed) is int and type(sp.temperature) is float
    assert SamplingParams(stop=None, stop_token_ids=None).stop_token_ids == []


# -- frontend odds and ends ---------------------------------------------------------------------------------------
def test_core_rejection_leaves_no_state(tiny_llama):
    llm = LLM(model=tiny_llama, dtype="float32", device="cpu", loader="safetensors", max_model_len=128,
              sets=["scheduler.enable_chunked_prefill=false", "scheduler.max_num_batched_tokens=16"])
    solo = llm.generate([{"prompt_token_ids": GOOD[0]}], GREEDY)[0].outputs[0].token_ids
    with pytest.raises(RequestError, match="chunked prefill is off"):
        llm.engine.add_request({"prompt_token_ids": list(range(20))}, GREEDY, request_id="long")
    assert not llm.engine.has_unfinished_requests()
    outs = llm.generate([{"prompt_token_ids": list(range(20))}, {"prompt_token_ids": GOOD[0]}], GREEDY)
    assert outs[0].error and "chunked prefill is off" in outs[0].error
    assert outs[1].outputs[0].token_ids == solo
    assert_clean(llm)


def test_get_stats_reports_load(llm):
    idle = llm.get_stats()
    assert isinstance(idle, EngineStats) and idle.num_total_blocks > 0 and idle.kv_cache_usage == 0
    it = long_stream(llm)
    next(it)
    busy = llm.get_stats()
    assert busy.num_running_reqs == 1 and busy.num_waiting_reqs == 0 and busy.num_used_blocks > 0
    assert busy.kv_cache_usage == pytest.approx(busy.num_used_blocks / busy.num_total_blocks)
    assert 0.0 <= busy.prefix_cache_hit_rate <= 1.0
    it.close()
    assert_clean(llm)


def test_direct_engine_api_still_returns_outputs(llm, solo):
    """Requests added with LLMEngine.add_request (no consumer) come back from step(), also when a stream
    drives the engine meanwhile."""
    eng = llm.engine
    eng.add_request({"prompt_token_ids": GOOD[2]}, GREEDY, request_id="direct")
    streamed = list(llm.stream({"prompt_token_ids": GOOD[0]}, GREEDY))
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            done[o.request_id] = o
    assert done["direct"].outputs[0].token_ids == solo(GOOD[2])
    assert streamed[-1].outputs[0].token_ids == solo(GOOD[0])
    assert_clean(llm)


def test_weave_error_is_the_only_escape(llm):
    for bad in ({"prompt_token_ids": object()}, {"prompt_token_ids": [2**70]}, {"prompt_token_ids": [-1]},
                {"prompt_token_ids": [10**5000]}):
        with pytest.raises(WeaveError):
            llm.engine.add_request(bad, GREEDY)
    for ids in (5, [5], None):
        with pytest.raises(RequestError, match="request_ids: must be a str or a list of str"):
            llm.abort(ids)
    assert_clean(llm)


def test_error_output_keeps_what_can_be_shown(llm):
    outs = llm.generate(["no tokenizer here", {"prompt": "text", "prompt_token_ids": [1.5]}], GREEDY)
    assert [o.prompt for o in outs] == ["no tokenizer here", "text"]
    assert all(o.prompt_token_ids == [] and o.finished and o.error for o in outs)
