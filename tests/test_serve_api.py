"""Issue 15 "Done when": a real `weavelm serve` process on 127.0.0.1, driven by the real `openai` client (streaming
and not, both endpoints) and by 200 concurrent raw SSE clients of which 20% disconnect. Outputs equal
`LLM.generate` on the same prompts and seeds; afterwards /metrics shows no running request and no used KV block."""

import asyncio

import httpx
import openai
import pytest
import torch

from tests.serve_utils import ENGINE_KWARGS, ServerProcess, metric, sse_events
from weavelm import LLM, SamplingParams

API_KEY = "test-key"
NAME = "tiny-smol"
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]


LAYOUTS = {"core-thread": ("--set", "engine_process=false"), "core-process": ("--set", "engine_process=true"),
           "two-api-servers": ("--api-server-count", "2")}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def server(request, smol_tokenizer_model):
    """Every test runs against each server layout: the core stepped by a thread of the server (the CPU default);
    the core in its own process, its outputs read by a task of the server's event loop (the GPU default); two
    API-server processes sharing the port in front of one core process (`--api-server-count 2`)."""
    layout = LAYOUTS[request.param]
    srv = ServerProcess(smol_tokenizer_model, "--api-key", API_KEY, "--served-model-name", NAME, "other-name",
                        *layout)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def offline(smol_tokenizer_model):
    torch.set_num_threads(1)
    llm = LLM(model=smol_tokenizer_model, **ENGINE_KWARGS)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def _params(i: int, max_tokens: int = 8) -> tuple[SamplingParams, dict]:
    """Greedy for even i, seeded sampling for odd i: the engine's params and the same as API fields."""
    fields = dict(max_tokens=max_tokens, temperature=0.0) if i % 2 == 0 else \
        dict(max_tokens=max_tokens, temperature=0.9, top_p=0.95, seed=1000 + i)
    return SamplingParams(ignore_eos=True, **fields), fields


@pytest.mark.parametrize("stream", [False, True])
def test_completions_equal_offline_generate(client, offline, stream):
    for i, prompt in enumerate(PROMPTS * 2):
        params, fields = _params(i)
        want = offline.generate([prompt], params)[0].outputs[0]
        kwargs = dict(model=NAME, prompt=prompt, extra_body={"ignore_eos": True}, **fields)
        if stream:
            chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                                    **kwargs))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            usage = chunks[-1].usage
        else:
            resp = client.completions.create(**kwargs)
            text, finish, usage = resp.choices[0].text, resp.choices[0].finish_reason, resp.usage
            assert resp.model == NAME
        assert text == want.text and finish == "length"
        assert usage.completion_tokens == 8 and usage.total_tokens == usage.prompt_tokens + 8


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_offline_chat(client, offline, stream):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
    for i in range(2):
        params, fields = _params(i)
        want = offline.chat(messages, params)
        want = (want[0] if isinstance(want, list) else want).outputs[0]
        kwargs = dict(model=NAME, messages=messages, extra_body={"ignore_eos": True}, **fields)
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kwargs))
            assert chunks[0].choices[0].delta.role == "assistant"
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            assert chunks[-1].choices[0].finish_reason == "length"
        else:
            resp = client.chat.completions.create(**kwargs)
            text = resp.choices[0].message.content
            assert resp.choices[0].message.role == "assistant" and resp.usage.completion_tokens == 8
        assert text == want.text


def test_n3_with_a_seed_is_reproducible_and_distinct(client):
    def run():
        resp = client.completions.create(model=NAME, prompt="Tell me a story", n=3, seed=7, temperature=1.0,
                                         max_tokens=8, extra_body={"ignore_eos": True})
        return [c.text for c in sorted(resp.choices, key=lambda c: c.index)]

    first = run()
    assert len(first) == 3 and len(set(first)) == 3
    assert run() == first
    chat = [client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], n=3, seed=7,
                                           max_tokens=6, extra_body={"ignore_eos": True}) for _ in range(2)]
    texts = [[c.message.content for c in sorted(r.choices, key=lambda c: c.index)] for r in chat]
    assert texts[0] == texts[1] and len(set(texts[0])) == 3


def test_stop_logprobs_echo_and_token_prompts(client, offline, smol_tokenizer_model):
    tok = offline.get_tokenizer()
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    full = offline.generate(["Once upon a time"], greedy)[0].outputs[0]
    stop = full.text[4:7]
    resp = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=12, temperature=0,
                                     stop=[stop], echo=True, logprobs=2, extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    assert choice.text == "Once upon a time" + full.text[:full.text.find(stop)] and choice.finish_reason == "stop"
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) >= 1
    assert all(x <= 0 for x in lp.token_logprobs) and lp.text_offset[0] == len("Once upon a time")
    ids = tok.encode("Once upon a time")
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == full.text
    batch = client.completions.create(model=NAME, prompt=["Once upon a time", "Hello"], max_tokens=4,
                                      temperature=0, n=2)
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          logprobs=True, top_logprobs=2, max_completion_tokens=3)
    assert len(chat.choices[0].logprobs.content) == 3 and chat.usage.completion_tokens == 3
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in chat.choices[0].logprobs.content)


def test_errors_in_openai_shape(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x", temperature=-1)
    assert e.value.body["param"] == "temperature" and "temperature" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}],
                                       max_completion_tokens=0)
    assert e.value.body["param"] == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x", extra_body={"top_k": "many"})
    assert e.value.body["param"] == "top_k"
    with pytest.raises(openai.BadRequestError) as e:  # prompt too long
        client.completions.create(model=NAME, prompt=[5] * 600, max_tokens=1)
    assert e.value.body["param"] == "prompt" and "max_model_len" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "x"})
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_models_health_version_tokenize_detokenize(client, server, offline):
    assert [m.id for m in client.models.list().data] == [NAME, "other-name"]
    assert httpx.get(server.url + "/health").status_code == 200
    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(server.url + "/version").status_code == 401  # every endpoint but /health needs the key
    assert httpx.get(server.url + "/version", headers=auth).json()["version"]
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}, headers=auth).json()
    assert ids["tokens"] == offline.get_tokenizer().encode("Hello world") and ids["count"] == len(ids["tokens"])
    text = httpx.post(server.url + "/detokenize", json={"tokens": ids["tokens"]}, headers=auth).json()
    assert text["prompt"] == "Hello world"
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10**9]}, headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


async def _load(url: str, jobs: list[tuple[str, dict, bool]]) -> list[tuple[str, str | None, bool]]:
    """Run every (prompt, fields, disconnect) as a streaming completion at once; returns (text, finish reason,
    saw [DONE]) per job. A disconnecting job closes its connection after its first chunk."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    limits = httpx.Limits(max_connections=len(jobs) + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=120) as http:
        async def one(prompt: str, fields: dict, disconnect: bool):
            body = dict(model=NAME, prompt=prompt, stream=True, ignore_eos=True, **fields)
            text, finish, done, lines = "", None, False, []
            async with http.stream("POST", "/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    lines.append(line)
                    if disconnect and line.startswith("data: {"):
                        return "", None, False
            for ev in sse_events(lines):
                if ev == "[DONE]":
                    done = True
                elif ev["choices"]:
                    text += ev["choices"][0]["text"]
                    finish = ev["choices"][0]["finish_reason"] or finish
            return text, finish, done

        return await asyncio.gather(*(one(*job) for job in jobs))


def test_200_concurrent_streams_with_disconnects(server, offline):
    jobs, want = [], {}
    for i in range(200):
        disconnect = i % 5 == 0
        # mostly greedy: sampling over a 49k vocabulary costs most of a CPU step; every 10th is seeded
        fields = dict(max_tokens=400 if disconnect else 8, temperature=0.0)
        if i % 10 == 3:
            fields.update(temperature=0.9, seed=1000 + i)
        params = SamplingParams(ignore_eos=True, **fields)
        prompt = f"Request {i}: {PROMPTS[i % 3]}"
        jobs.append((prompt, fields, disconnect))
        if not disconnect:
            want[i] = (prompt, params)
    before = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    results = asyncio.run(_load(server.url, jobs))
    offline_outs = offline.generate([p for p, _ in want.values()], [sp for _, sp in want.values()])
    for (i, _), ref in zip(want.items(), offline_outs):
        assert results[i] == (ref.outputs[0].text, "length", True), i
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    for _ in range(20):  # aborts are applied before the engine's next step
        if metric(text, "weavelm:num_requests_running") == 0 and metric(text, "weavelm:kv_cache_used_blocks") == 0:
            break
        text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    assert metric(text, "weavelm:num_requests_running") == 0
    assert metric(text, "weavelm:num_requests_waiting") == 0
    assert metric(text, "weavelm:kv_cache_used_blocks") == 0
    aborted = metric(text, "weavelm:request_success_total", finished_reason="abort") - \
        metric(before, "weavelm:request_success_total", finished_reason="abort")
    assert aborted == 40  # the 400-token requests were aborted on disconnect, not run to the end
    assert metric(text, "weavelm:time_to_first_token_seconds_count") >= 160
    assert metric(text, "weavelm:generation_tokens_total") >= 160 * 8
