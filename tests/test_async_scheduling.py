"""Async scheduling (step N+1 scheduled and launched before step N is collected) on the CPU: the output is the same
as the synchronous engine's, token for token, for greedy and seeded sampling, with chunked prefill, prefix caching,
preemption forced by a small KV pool, stop tokens, logprobs, logits processors and aborts; and the scheduler's
placeholder bookkeeping holds when driven directly."""

import pytest

from tests.model_fixtures import ARCHS
from weavelm import LLM, SamplingParams
from weavelm.testing import StepRecorder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHARED = list(range(100, 116))
PROMPTS = [
    {"prompt_token_ids": [5, 6, 7, 8, 9] * 3},
    {"prompt_token_ids": [(i * 37) % 500 + 3 for i in range(60)]},  # longer than the step budget: chunked
    {"prompt_token_ids": SHARED + [20, 21, 22, 23]},  # these two share 4 blocks: prefix caching
    {"prompt_token_ids": SHARED + [30, 31, 32]},
    {"prompt_token_ids": [3, 4] * 6},
    {"prompt_token_ids": [7]},
]
MAX_TOKENS = [24, 30, 17, 9, 28, 1]
ENGINE = dict(dtype="float32", device="cpu", cache={"num_blocks": 26, "block_size": 4},
              scheduler={"max_num_batched_tokens": 32, "max_num_seqs": 8})


def _engine(model: str, async_scheduling: bool, recorder: StepRecorder | None = None, **kw) -> LLM:
    recorder = recorder or StepRecorder()
    return LLM(model=model, async_scheduling=async_scheduling, registry=recorder.registry(), **{**ENGINE, **kw})


def _generate(model: str, async_scheduling: bool, prompts, params, **kw):
    """The outputs of a fresh engine, checking through its step stats that it scheduled ahead iff asked to."""
    recorder = StepRecorder()
    with _engine(model, async_scheduling, recorder, **kw) as llm:
        outs = llm.generate(prompts, params)
    assert recorder.scheduled_ahead is async_scheduling
    return outs


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_identical_with_preemption_chunking_and_prefix_caching(tiny_models, arch):
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in MAX_TOKENS]
    results = {}
    for mode in (False, True):
        recorder = StepRecorder()
        llm = _engine(tiny_models[arch], mode, recorder)
        results[mode] = _tokens(llm.generate(PROMPTS, params))
        assert recorder.num_preempted > 0, "the pool must force preemption"
        assert recorder.scheduled_ahead is mode
        stats = llm.get_stats()
        assert stats.num_used_blocks == 0 and stats.num_running_reqs == 0 and stats.num_waiting_reqs == 0
    assert results[True] == results[False]
    assert [len(t) for t in results[True]] == MAX_TOKENS


def test_seeded_sampling_logprobs_and_processors_identical(tiny_llama):
    params = [SamplingParams(max_tokens=m, temperature=0.8, top_p=0.9, top_k=40, seed=7 + i, logprobs=2,
                             repetition_penalty=1.2 if i % 2 else 1.0, ignore_eos=True)
              for i, m in enumerate(MAX_TOKENS)]
    runs = {mode: _generate(tiny_llama, mode, PROMPTS, params) for mode in (False, True)}
    assert _tokens(runs[True]) == _tokens(runs[False])
    for a, b in zip(runs[True], runs[False]):
        la, lb = a.outputs[0].logprobs, b.outputs[0].logprobs
        assert len(la) == len(lb) == len(a.outputs[0].token_ids)
        for da, db in zip(la, lb):
            assert list(da) == list(db)
            assert all(abs(da[t].logprob - db[t].logprob) < 1e-5 for t in da)


def test_stop_tokens_end_requests_without_extra_output(tiny_llama):
    """A stop token found in step N is known only after step N+1 was launched: the extra step's token is
    dropped, and the output equals the synchronous one."""
    base = _generate(tiny_llama, False, PROMPTS, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    stops = [o.outputs[0].token_ids[min(3 + i, len(o.outputs[0].token_ids) - 1)] for i, o in enumerate(base)]
    params = [SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[s]) for s in stops]
    runs = {mode: _generate(tiny_llama, mode, PROMPTS, params) for mode in (False, True)}
    assert _tokens(runs[True]) == _tokens(runs[False])
    assert [o.outputs[0].finish_reason for o in runs[True]] == [o.outputs[0].finish_reason for o in runs[False]]
    assert any(o.outputs[0].finish_reason == "stop" for o in runs[True])


def test_abort_mid_flight_frees_everything(tiny_llama):
    llm = _engine(tiny_llama, True)
    engine = llm.engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), request_id=f"r{i}")
    for _ in range(4):
        engine.step()
    engine.abort_request(["r0", "r2"])
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert {"r1", "r3", "r4", "r5"} <= set(finished)
    assert llm.get_stats().num_used_blocks == 0
    engine.add_request(PROMPTS[0], SamplingParams(max_tokens=2, temperature=0), request_id="late")
    while engine.has_unfinished_requests():
        engine.step()
    assert set(llm.collective_rpc("cached_request_ids")[0]) <= {"late"}


def test_placeholders_in_the_scheduler_driven_directly():
    """schedule() for step 2 before update_from_output() of step 1: the request is granted its next decode on
    the unknown token, a request whose last token is in flight is not scheduled again, and placeholders return to
    zero once the outputs are folded in."""
    from weavelm.core.contexts import SchedulerContext
    from weavelm.core.outputs import ModelRunnerOutput
    from weavelm.core.request import Request
    from weavelm.plugins.schedulers.fcfs import FCFSScheduler
    from weavelm.scheduling import SchedulerOptions

    sched = FCFSScheduler(SchedulerOptions(), SchedulerContext(num_blocks=64, block_size=4, max_model_len=64,
                                                               enable_prefix_caching=True, async_scheduling=True))
    a = Request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=3, ignore_eos=True))
    b = Request("b", [6, 7], SamplingParams(max_tokens=1, ignore_eos=True))
    sched.add_request(a)
    sched.add_request(b)

    def output(so, tokens):
        ids = list(so.num_scheduled_tokens)
        return ModelRunnerOutput(ids, {r: i for i, r in enumerate(ids)}, [[tokens[r]] for r in ids], None)

    s1 = sched.schedule()
    assert s1.num_scheduled_tokens == {"a": 5, "b": 2}
    assert a.num_output_placeholders == 1 and b.num_output_placeholders == 1
    s2 = sched.schedule()  # step 1 still in flight: b's only token is in flight, a decodes on its placeholder
    assert s2.num_scheduled_tokens == {"a": 1}
    assert a.num_computed_tokens == 6 and a.num_output_placeholders == 2
    outs = sched.update_from_output(s1, output(s1, {"a": 10, "b": 11}))
    assert {o.request_id: (o.new_token_ids, o.finish_reason) for o in outs} == {"a": ([10], None),
                                                                               "b": ([11], "length")}
    assert a.num_output_placeholders == 1
    s3 = sched.schedule()
    assert s3.num_scheduled_tokens == {"a": 1} and s3.finished_req_ids == {"b"}
    sched.update_from_output(s2, output(s2, {"a": 12}))
    assert sched.schedule().is_empty  # a's third and last token is in flight
    outs = sched.update_from_output(s3, output(s3, {"a": 13}))
    assert outs[0].finish_reason == "length" and a.output_token_ids == [10, 12, 13]
    assert a.num_output_placeholders == 0 and not sched.has_unfinished_requests()
    sched.kv.check_invariants()


def test_engine_core_process_with_async_scheduling(tiny_llama):
    """The engine-core process's loop (what `weavelm serve` runs on a GPU) launches before it collects, too."""
    params = [SamplingParams(max_tokens=m, temperature=0.7 if i % 2 else 0, seed=i, ignore_eos=True)
              for i, m in enumerate(MAX_TOKENS)]
    want = _tokens(_generate(tiny_llama, False, PROMPTS, params))
    with LLM(model=tiny_llama, async_scheduling=True, engine_process=True, **ENGINE) as llm:
        assert _tokens(llm.generate(PROMPTS, params)) == want
        streamed = [o.outputs[0].token_ids for o in llm.stream(PROMPTS[1], params[1])]
        assert streamed[-1] == want[1]
        assert llm.get_stats().num_used_blocks == 0


def test_logits_processors_see_the_latest_token(tiny_llama):
    """Penalties, bad words and min_tokens read a row's output tokens: a step whose previous token is still in flight
    waits for it before building them, so the output equals the synchronous engine's. The min_tokens case is built
    so that a lag of one token would change it: the stop token is the greedy continuation's 7th token, allowed from
    exactly that position."""
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    seqs = _tokens(_generate(tiny_llama, False, PROMPTS, greedy))
    i, seq = next((i, s) for i, s in enumerate(seqs) if len(s) > 6 and s[6] not in s[:6])
    params = [SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[seq[6]], min_tokens=6),
              SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, presence_penalty=2.0,
                             frequency_penalty=1.5),
              SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=3.0)]
    prompts = [PROMPTS[i], PROMPTS[0], PROMPTS[4]]
    runs = {mode: _generate(tiny_llama, mode, prompts, params) for mode in (False, True)}
    assert runs[False][0].outputs[0].token_ids == seq[:7] and runs[False][0].outputs[0].finish_reason == "stop"
    assert _tokens(runs[True]) == _tokens(runs[False])


def test_engine_suites_pass_under_async_scheduling():
    """The scheduling-parity, robust-request, step-isolation, frontend and plugin-hook suites, run with async
    scheduling as the default on the CPU (the `tests.async_default` pytest plugin), in a subprocess."""
    import os
    import subprocess
    import sys

    suites = ["tests/test_scheduling_parity.py", "tests/test_robust_requests.py", "tests/test_step_isolation.py",
              "tests/test_frontend.py", "tests/test_plugins.py"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.async_default",
                           *suites],
                          capture_output=True, text=True, timeout=900,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stdout[-4000:]
