"""Hostile probe, round 2, items 5 and 8 on uvicorn in this process: HTTP read limits (a slowloris client gets 408
and loses its connection, oversized headers get 431, idle keep-alive connections close, the flags reach uvicorn);
a graceful shutdown past --shutdown-timeout answers 503 in OpenAI's shape and ends streams with finish_reason
"abort" and [DONE]."""

import asyncio
import json
import socket
import time

import httpx
import pytest
import torch

from tests.hostile_utils import ThreadServer
from tests.serve_utils import ENGINE_KWARGS, sse_events
from weavelm.core.async_llm import AsyncLLM
from weavelm.serve.app import build_app
from weavelm.serve.http_limits import HTTPLimits


@pytest.fixture
def engine(smol_tokenizer_model):
    torch.set_num_threads(1)
    engine = AsyncLLM(model=smol_tokenizer_model, max_model_len=256, **ENGINE_KWARGS)
    yield engine
    engine.shutdown()


@pytest.fixture
def server(engine):
    srv = ThreadServer(build_app(engine, "tiny"), HTTPLimits(timeout_keep_alive=0.5, request_read_timeout=1.0,
                                                             max_header_bytes=8192))
    yield srv
    srv.stop()


def _read_all(sock: socket.socket, limit_s: float) -> bytes:
    sock.settimeout(limit_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return data


def test_a_slowloris_client_is_cut_off(server):
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    t0 = time.monotonic()
    closed_after = None
    for i in range(40):  # one header byte every 0.1 s: never done
        try:
            sock.sendall(b"X")
        except OSError:
            closed_after = time.monotonic() - t0
            break
        time.sleep(0.1)
    answer = _read_all(sock, 2.0)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert closed_after is None or closed_after < 3.0
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert "1 s" in body["error"]["message"]


def test_a_slow_body_is_cut_off(server):
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n"
                 b"\r\n{\"prompt\"")
    t0 = time.monotonic()
    answer = _read_all(sock, 5.0)
    sock.close()
    assert time.monotonic() - t0 < 3.0
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:200]


def test_oversized_headers_get_431(server):
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n")
    answer = _read_all(sock, 5.0)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert httpx.get(server.url + "/health", headers={"X-Ok": "a" * 4000}).status_code == 200


def test_idle_keep_alive_connections_close(server):
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    t0 = time.monotonic()
    answer = _read_all(sock, 5.0)  # the response, then the close after the keep-alive timeout
    sock.close()
    assert answer.startswith(b"HTTP/1.1 200") and time.monotonic() - t0 < 3.0


def test_the_flags_reach_uvicorn():
    import argparse

    from weavelm.serve.cli import add_serve_parser, http_limits

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(), add_engine_args=lambda p: None)
    args = parser.parse_args(["serve", "--timeout-keep-alive", "2", "--request-read-timeout", "7",
                              "--max-header-bytes", "1000", "--limit-concurrency", "0",
                              "--max-request-body-bytes", "5"])
    assert http_limits(args) == HTTPLimits(timeout_keep_alive=2, request_read_timeout=7, max_header_bytes=1000,
                                           limit_concurrency=None)
    assert args.max_request_body_bytes == 5
    defaults = parser.parse_args(["serve"])
    assert http_limits(defaults) == HTTPLimits() and HTTPLimits().limit_concurrency


# -- item 5: shutdown past the timeout ----------------------------------------------------------------------------
def test_shutdown_past_the_timeout_answers_503_and_ends_streams(engine, monkeypatch):
    step = engine.client.core.step_fn

    def slow_step(*args, **kwargs):
        time.sleep(0.02)
        return step(*args, **kwargs)

    monkeypatch.setattr(engine.client.core, "step_fn", slow_step)
    server = ThreadServer(build_app(engine, "tiny"), shutdown_timeout=0.5)
    body = {"prompt": "Tell me", "max_tokens": 200, "ignore_eos": True}
    chat = {"messages": [{"role": "user", "content": "Tell me"}], "max_tokens": 200, "ignore_eos": True}

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            async def stream(path, payload):
                lines = []
                async with http.stream("POST", path, json={**payload, "stream": True}) as r:
                    async for line in r.aiter_lines():
                        lines.append(line)
                return sse_events(lines)

            tasks = [asyncio.create_task(stream("/v1/completions", body)),
                     asyncio.create_task(stream("/v1/chat/completions", chat)),
                     asyncio.create_task(http.post("/v1/completions", json=body)),
                     asyncio.create_task(http.post("/v1/chat/completions", json=chat))]
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            stopper = asyncio.get_running_loop().run_in_executor(None, server.stop)
            results = await asyncio.gather(*tasks)
            await stopper
            return results, time.monotonic() - t0

    (completion, chat_events, plain, plain_chat), took = asyncio.run(run())
    assert took < 4.0
    for events, choice_key in [(completion, "text"), (chat_events, "delta")]:
        assert events[-1] == "[DONE]", events[-3:]
        last = events[-2]
        assert last["choices"][0]["finish_reason"] == "abort", last
    for r in (plain, plain_chat):
        assert r.status_code == 503, (r.status_code, r.text)
        assert r.json()["error"]["code"] == "aborted"
