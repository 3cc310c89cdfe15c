"""AsyncLLM and the server app in this process: deltas and cancellation, 429 over the waiting limit, 503 once the
engine loop died, and a Hypothesis run over the request bodies that must never produce a 500."""

import asyncio
import json
import math
import threading

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serve_utils import ENGINE_KWARGS
from weavelm import LLM, SamplingParams
from weavelm.core.async_llm import AsyncLLM
from weavelm.errors import EngineDeadError, RequestError
from weavelm.serve.app import build_app

NAME = "tiny"


@pytest.fixture(scope="module")
def llm(smol_tokenizer_model):
    torch.set_num_threads(1)
    llm = LLM(model=smol_tokenizer_model, max_model_len=96, **ENGINE_KWARGS)
    yield llm
    llm.shutdown()


@pytest.fixture
def engine(smol_tokenizer_model):
    engine = AsyncLLM(model=smol_tokenizer_model, max_model_len=96, **ENGINE_KWARGS)
    yield engine
    engine.shutdown()


def pause_core(engine: AsyncLLM, monkeypatch) -> threading.Event:
    """Hold the in-process core's thread inside its next step until the returned event is set."""
    core, go = engine.client.core, threading.Event()
    step = core.step_fn
    monkeypatch.setattr(core, "step_fn", lambda: go.wait(30) and step())
    return go


def test_generate_streams_deltas_and_cumulative_outputs(engine, llm):
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    want = llm.generate(["Hello there"], params)[0].outputs[0]

    async def run(delta: bool):
        return [out async for out in engine.generate("Hello there", params, delta=delta)]

    deltas = asyncio.run(run(True))
    assert "".join(o.outputs[0].text for o in deltas) == want.text
    assert sum((o.outputs[0].token_ids for o in deltas), []) == want.token_ids
    cumulative = asyncio.run(run(False))
    assert cumulative[-1].finished and cumulative[-1].outputs[0].text == want.text
    assert all(b.outputs[0].text.startswith(a.outputs[0].text) for a, b in zip(cumulative, cumulative[1:]))
    bad = SamplingParams()
    bad.max_tokens = 0  # re-validated by the engine when added

    async def add_bad():
        await engine.add_request("x", bad)

    with pytest.raises(RequestError, match="max_tokens"):
        asyncio.run(add_bad())
    assert engine.num_waiting == 0 and engine.num_unfinished == 0


def test_cancelling_the_consumer_aborts_and_frees_blocks(engine):
    async def run():
        first = asyncio.Event()

        async def consume():
            async for _ in engine.generate("Long story", SamplingParams(max_tokens=80, ignore_eos=True)):
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        assert (await engine.get_stats()).num_running_reqs == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await engine.get_stats()

    stats = asyncio.run(run())
    assert stats.num_running_reqs == 0 and stats.num_waiting_reqs == 0 and stats.num_used_blocks == 0
    assert engine.num_unfinished == 0 and engine.num_waiting == 0


def test_429_when_the_waiting_queue_is_over_the_limit(engine, monkeypatch):
    app = build_app(engine, NAME, max_waiting=2)
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 2}

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            go = pause_core(engine, monkeypatch)  # requests stay waiting for their first output
            try:
                first = [asyncio.create_task(http.post("/v1/completions", json=body)) for _ in range(2)]
                while engine.num_waiting < 2:
                    await asyncio.sleep(0.01)
                over = await http.post("/v1/completions", json=body)
            finally:
                go.set()
            return over, [await t for t in first]

    over, first = asyncio.run(run())
    assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limit_exceeded"
    assert [r.status_code for r in first] == [200, 200]


def test_503_once_the_engine_loop_died(engine, monkeypatch):
    def broken_step(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(engine.client.core, "step_fn", broken_step)
    app = build_app(engine, NAME)
    with TestClient(app) as http:
        r = http.post("/v1/completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 3})
        assert r.status_code == 503 and "injected failure" in r.json()["error"]["message"]
        assert http.get("/health").status_code == 503
        again = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert again.status_code == 503 and again.json()["error"]["type"] == "service_unavailable_error"
        assert http.get("/metrics").status_code == 200
    with pytest.raises(EngineDeadError):
        asyncio.run(engine.add_request("Hi"))


# -- property-based: any body, no 500 --------------------------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                 max_size=3), max_leaves=6)
SMALL_TOKENS = st.integers(1, 3)
FIELDS = {
    "model": st.sampled_from([NAME, "other", None]) | JSON,
    "max_tokens": SMALL_TOKENS | st.sampled_from([0, -1, 2**40, 1.5, "3", None, True]),
    "max_completion_tokens": SMALL_TOKENS | st.sampled_from([0, -5, None, "x"]),
    "n": st.integers(-1, 3) | JSON,
    "temperature": st.floats() | st.integers(-3, 3) | JSON,
    "top_p": st.floats() | JSON, "top_k": st.integers(-2, 70000) | JSON, "min_p": st.floats() | JSON,
    "seed": st.integers(-2**64, 2**64) | JSON, "stop": JSON | st.lists(st.text(max_size=3), max_size=2),
    "logprobs": st.integers(-2, 25) | JSON, "top_logprobs": st.integers(-2, 25) | JSON,
    "echo": st.booleans() | JSON, "stream": st.booleans() | JSON,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | JSON,
    "presence_penalty": st.floats(-3, 3) | JSON, "logit_bias": st.dictionaries(
        st.sampled_from(["0", "5", "-1", "x", "99999999"]), st.floats(-200, 200), max_size=2) | JSON,
    "ignore_eos": st.booleans() | JSON, "stop_token_ids": st.lists(st.integers(-1, 60000), max_size=2) | JSON,
    "priority": st.integers(-5, 5) | JSON, "suffix": st.none() | st.text(max_size=2), "best_of": JSON,
    "user": st.text(max_size=3), "unknown_field": JSON,
}
PROMPT = st.text(min_size=1, max_size=12) | st.lists(st.integers(-1, 50000), max_size=4) | \
    st.lists(st.text(max_size=5), max_size=2) | st.lists(st.lists(st.integers(0, 50000), max_size=3), max_size=2) | JSON
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]),
                                           "content": st.text(max_size=10) | JSON}), max_size=3) | JSON


@st.composite
def bodies(draw):
    endpoint = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]))
    chosen = draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=6, unique=True))
    fields = {name: draw(FIELDS[name]) for name in chosen}
    if "max_tokens" not in fields and "max_completion_tokens" not in fields:
        fields["max_tokens"] = draw(SMALL_TOKENS)  # keep generation short on CPU
    if endpoint == "/v1/completions":
        return endpoint, {**fields, "prompt": draw(PROMPT)}
    if endpoint == "/v1/chat/completions":
        return endpoint, {**fields, "messages": draw(MESSAGES)}
    if endpoint == "/tokenize":
        return endpoint, draw(st.fixed_dictionaries({}, optional={"prompt": PROMPT, "messages": MESSAGES,
                                                                 "add_special_tokens": JSON}))
    return endpoint, {"tokens": draw(st.lists(st.integers(-1, 60000), max_size=4) | JSON)}


def test_no_request_body_gives_a_500(engine, llm):
    app = build_app(engine, NAME)
    seen: set[int] = set()
    with TestClient(app, raise_server_exceptions=False) as http:
        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(bodies())
        def check(case):
            endpoint, body = case
            r = http.post(endpoint, content=json.dumps(body, allow_nan=True), headers={"content-type":
                                                                                       "application/json"})
            seen.add(r.status_code)
            assert r.status_code in (200, 400, 404), (r.status_code, r.text)
            if r.status_code != 200:
                error = r.json()["error"]
                assert isinstance(error["message"], str) and error["message"] and error["type"]
            elif endpoint.startswith("/v1") and not body.get("stream"):
                assert r.json()["choices"]

        check()
    assert {200, 400} <= seen
    stats = asyncio.run(engine.get_stats())
    assert stats.num_running_reqs == 0 and stats.num_used_blocks == 0 and not math.isnan(stats.kv_cache_usage)
