"""Hostile probe, round 2, items 2, 9, 10 and 12 against the app in this process: one large request must not stall
the server (prompt bounds before tokenizing, tokenizing off the event loop, bounded stop lists, a capped body); the
API key covers every endpoint but /health and no response shows a filesystem path; a batch that can never fit the
waiting limit is a 400; responses match the published schema (400 not 422, /health, 405's Allow, JSON errors)."""

import asyncio
import os
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from tests.hostile_utils import ThreadServer
from tests.serve_utils import ENGINE_KWARGS
from weavelm.core.async_llm import AsyncLLM
from weavelm.serve.app import build_app

MAX_LEN = 96


@pytest.fixture
def engine(smol_tokenizer_model):
    torch.set_num_threads(1)
    engine = AsyncLLM(model=smol_tokenizer_model, max_model_len=MAX_LEN, **ENGINE_KWARGS)
    yield engine
    engine.shutdown()


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    error = r.json()["error"]
    assert error["message"] and error["type"]
    return error


# -- item 2: one large request stalls no one ---------------------------------------------------------------------
def test_prompts_over_the_bound_are_refused_before_tokenizing(engine, monkeypatch):
    calls = []
    real = engine.tokenizer.encode
    monkeypatch.setattr(engine.tokenizer, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    huge = "word " * 200_000
    with TestClient(build_app(engine, "tiny")) as http:
        for path, body in [("/v1/completions", {"prompt": huge, "max_tokens": 1}),
                           ("/v1/completions", {"prompt": ["short", huge], "max_tokens": 1}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": huge}]}),
                           ("/tokenize", {"prompt": huge}),
                           ("/tokenize", {"messages": [{"role": "user", "content": huge}]})]:
            error = _error(http.post(path, json=body), 400)
            assert "max_model_len" in error["message"] and str(MAX_LEN) in error["message"], error
        assert not calls, "the tokenizer ran on a prompt over the bound"
        error = _error(http.post("/v1/completions", json={"prompt": list(range(50)) * 100, "max_tokens": 1}), 400)
        assert "5000 tokens" in error["message"] and f"max_model_len is {MAX_LEN}" in error["message"]
        assert error["param"] == "prompt"


def test_prompts_are_tokenized_off_the_event_loop(engine, monkeypatch):
    threads = []
    real = engine.tokenizer.encode
    monkeypatch.setattr(engine.tokenizer, "encode",
                        lambda *a, **k: threads.append(threading.current_thread()) or real(*a, **k))
    with TestClient(build_app(engine, "tiny")) as http:
        assert http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 1}).status_code == 200
        assert http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                       "max_tokens": 1}).status_code == 200
        assert http.post("/tokenize", json={"prompt": "Hello"}).status_code == 200
        assert http.post("/tokenize", json={"prompt": "Hello", "add_special_tokens": False}).status_code == 200
    assert len(threads) >= 4
    assert all(t.name.startswith("weavelm-tokenize") for t in threads), [t.name for t in threads]
    decoded = []
    real_decode = engine.tokenizer.decode
    monkeypatch.setattr(engine.tokenizer, "decode",
                        lambda *a, **k: decoded.append(threading.current_thread()) or real_decode(*a, **k))
    with TestClient(build_app(engine, "tiny")) as http:
        assert http.post("/detokenize", json={"tokens": [1, 2, 3]}).status_code == 200
        error = _error(http.post("/detokenize", json={"tokens": [1] * (4 * MAX_LEN + 1)}), 400)
        assert error["param"] == "tokens" and str(4 * MAX_LEN) in error["message"]
        assert _error(http.post("/detokenize", json={"tokens": [-1]}), 400)["param"] == "tokens"
    threads = decoded
    assert len(threads) >= 1
    assert all(t.name.startswith("weavelm-tokenize") for t in threads), [t.name for t in threads]


def test_stop_lists_are_bounded(engine):
    with TestClient(build_app(engine, "tiny")) as http:
        many = _error(http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1,
                                                         "stop": [f"s{i}" for i in range(200_000)]}), 400)
        assert many["param"] == "stop" and "200000" in many["message"]
        long = _error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                              "max_tokens": 1, "stop": "x" * 100_000}), 400)
        assert long["param"] == "stop" and "100000" in long["message"]
        assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1,
                                                  "stop": ["a", "b"]}).status_code == 200


def test_the_request_body_is_capped(engine):
    app = build_app(engine, "tiny", max_request_body_bytes=4096)
    with TestClient(app) as http:
        error = _error(http.post("/v1/completions", json={"prompt": "x" * 5000, "max_tokens": 1}), 413)
        assert "4096" in error["message"] and "--max-request-body-bytes" in error["message"]

        def chunks():  # no content-length: counted as it arrives
            for _ in range(10):
                yield b" " * 1000
        _error(http.post("/tokenize", content=chunks(), headers={"content-type": "application/json"}), 413)
        assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_a_12_mb_prompt_stalls_neither_health_nor_a_stream(engine):
    server = ThreadServer(build_app(engine, "tiny"))
    try:
        async def run():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
                big = asyncio.create_task(http.post("/v1/completions", json={"prompt": "ab " * 4_000_000,
                                                                               "max_tokens": 1}))
                await asyncio.sleep(0.3)  # uploaded and being handled
                t0 = time.monotonic()
                health = await http.get("/health")
                t_health = time.monotonic() - t0
                t0 = time.monotonic()
                events = 0
                async with http.stream("POST", "/v1/completions", json={
                        "prompt": "Once upon a time", "max_tokens": 16, "ignore_eos": True, "stream": True}) as r:
                    async for line in r.aiter_lines():
                        events += line.startswith("data: ")
                t_stream = time.monotonic() - t0
                return health, t_health, events, t_stream, await big

        health, t_health, events, t_stream, big = asyncio.run(run())
    finally:
        server.stop()
    assert health.status_code == 200 and t_health < 1.5, t_health
    assert events >= 2 and t_stream < 1.5, t_stream
    assert big.status_code == 400


# -- item 9: the key covers everything but /health; no path in any response --------------------------------------
def test_api_key_covers_every_endpoint_but_health(engine):
    with TestClient(build_app(engine, "tiny", api_key="k")) as http:
        for path in ["/metrics", "/version", "/v1/models", "/openapi.json", "/docs"]:
            assert http.get(path).status_code == 401, path
            assert http.get(path, headers={"Authorization": "Bearer k"}).status_code == 200, path
        assert _error(http.post("/tokenize", json={"prompt": "x"}), 401)["code"] == "invalid_api_key"
        assert http.get("/health").status_code == 200


def test_no_filesystem_path_in_responses(engine, smol_tokenizer_model):
    folder = os.path.basename(os.path.normpath(smol_tokenizer_model))
    with TestClient(build_app(engine)) as http:
        bodies = [http.get("/v1/models").text, http.get("/metrics").text,
                  http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).text,
                  http.post("/v1/completions", json={"prompt": "Hi", "model": "nope"}).text]
        assert http.get("/v1/models").json()["data"][0]["id"] == folder
    for body in bodies:
        assert os.path.dirname(os.path.normpath(smol_tokenizer_model)) not in body, body[:300]


# -- item 10: a batch that can never fit the waiting limit ---------------------------------------------------------
def test_a_batch_over_the_waiting_limit_is_a_400(engine):
    with TestClient(build_app(engine, "tiny", max_waiting=2)) as http:
        error = _error(http.post("/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 1}), 400)
        assert "--max-waiting-requests" in error["message"] and "3" in error["message"] and "2" in error["message"]
        _error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "n": 3,
                                                       "max_tokens": 1}), 400)
        assert http.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 1}).status_code == 200


# -- item 12: responses match the schema --------------------------------------------------------------------------
def test_the_schema_documents_400_and_health_is_true(engine):
    with TestClient(build_app(engine, "tiny")) as http:
        schema = http.get("/openapi.json").json()
        for path, ops in schema["paths"].items():
            for method, op in ops.items():
                assert "422" not in op["responses"], (path, method)
        assert "400" in schema["paths"]["/v1/completions"]["post"]["responses"]
        health = http.get("/health")
        documented = schema["paths"]["/health"]["get"]["responses"]["200"]
        assert health.content == b"" and not documented.get("content"), documented


def test_405_has_an_allow_header(engine):
    with TestClient(build_app(engine, "tiny")) as http:
        r = http.put("/v1/completions", json={})
        _error(r, 405)
        assert r.headers["allow"] == "POST"
        assert "GET" in http.post("/health").headers["allow"]


def test_malformed_json_names_no_bogus_param(engine):
    with TestClient(build_app(engine, "tiny")) as http:
        r = http.post("/v1/completions", content=b'{"prompt": "x", "max_tokens": }',
                      headers={"content-type": "application/json"})
        error = _error(r, 400)
        assert error["param"] is None and "JSON" in error["message"], error
