"""LoRA adapters at run time (issue 29, item 3): `POST /v1/load_lora_adapter` on a real `weavelm serve` (the engine
core in its own process) lists the adapter, whose greedy completion equals transformers with it merged by peft;
unloading removes it from /v1/models, lets a request running on it finish its full length, and 404s new ones; a
path outside `--lora-allowed-paths`, a NaN adapter and a taken name are refused. In process: the endpoints are off
without `--enable-lora` / `--lora-allowed-paths`, and `LLM.add_lora` / `remove_lora` / `list_loras` (vLLM's)."""

from __future__ import annotations

import os
import shutil

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from tests.lora_fixtures import build_adapter, merged_greedy
from tests.serve_utils import ENGINE_KWARGS, ServerProcess, metric
from weavelm import LLM, SamplingParams
from weavelm.core.async_llm import AsyncLLM
from weavelm.errors import LoRAError
from weavelm.lora.request import LoRARequest
from weavelm.serve.app import build_app

PROMPT = [5, 17, 33, 8, 99, 4, 250]
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def adapters(smol_tokenizer_model, tmp_path_factory):
    """{"root": the allowed directory, "good": an adapter in it, "nan": one with NaN lora_B in it, "outside": a
    copy of the good one elsewhere}."""
    root = tmp_path_factory.mktemp("lora_allowed")
    good = build_adapter(smol_tokenizer_model, str(root / "good"), 4, 8, ["q_proj", "v_proj", "down_proj"], False,
                         seed=11)
    from safetensors.torch import load_file, save_file

    nan = str(root / "nan")
    shutil.copytree(good, nan)
    weights = load_file(os.path.join(nan, "adapter_model.safetensors"))
    save_file({k: v.fill_(float("nan")) if "lora_B" in k else v for k, v in weights.items()},
              os.path.join(nan, "adapter_model.safetensors"))
    outside = str(tmp_path_factory.mktemp("lora_elsewhere") / "copy")
    shutil.copytree(good, outside)
    return {"root": str(root), "good": good, "nan": nan, "outside": outside}


def _model_ids(client: openai.OpenAI) -> list[str]:
    return [m.id for m in client.models.list().data]


def test_load_serve_unload_on_a_core_process(smol_tokenizer_model, adapters):
    srv = ServerProcess(smol_tokenizer_model, "--served-model-name", "tiny", "--enable-lora", "--max-lora-rank",
                        "8", "--lora-allowed-paths", adapters["root"], "--set", "engine_process=true")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        admin = httpx.Client(base_url=srv.url, timeout=30)
        assert _model_ids(client) == ["tiny"]

        r = admin.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": adapters["good"]})
        assert r.status_code == 200, r.text
        cards = {m.id: m for m in client.models.list().data}
        assert list(cards) == ["tiny", "sql"] and cards["sql"].parent == "tiny"
        text = client.completions.create(model="sql", prompt=PROMPT, max_tokens=8, **GREEDY).choices[0].text
        tok = _tokenizer(smol_tokenizer_model)
        assert text == tok.decode(merged_greedy(smol_tokenizer_model, adapters["good"], PROMPT, 8))
        assert text != client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, **GREEDY).choices[0].text

        # refused: a taken name, a path outside the allowed roots (also through `..`), a NaN adapter
        r = admin.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": adapters["good"]})
        assert r.status_code == 400 and "loaded already" in r.json()["error"]["message"]
        for path in (adapters["outside"], os.path.join(adapters["root"], "..", os.path.basename(
                os.path.dirname(adapters["outside"])), "copy")):
            r = admin.post("/v1/load_lora_adapter", json={"lora_name": "out", "lora_path": path})
            assert r.status_code == 403 and "--lora-allowed-paths" in r.json()["error"]["message"], r.text
        r = admin.post("/v1/load_lora_adapter", json={"lora_name": "nan", "lora_path": adapters["nan"]})
        assert r.status_code == 400 and "not finite" in r.json()["error"]["message"], r.text
        assert _model_ids(client) == ["tiny", "sql"]

        # unloading with a request in flight: it finishes with its full length; new requests get 404 at once
        n = 480
        stream = client.completions.create(model="sql", prompt=PROMPT, max_tokens=n, stream=True, **GREEDY)
        chunks = iter(stream)
        first = next(chunks)
        r = admin.post("/v1/unload_lora_adapter", json={"lora_name": "sql"})
        assert r.status_code == 200, r.text
        assert metric(admin.get("/metrics").text, "weavelm:num_requests_running") == 1  # still running
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="sql", prompt=PROMPT, max_tokens=2)
        assert _model_ids(client) == ["tiny"]
        rest = list(chunks)
        full = first.choices[0].text + "".join(c.choices[0].text for c in rest if c.choices)
        assert rest[-1].choices[0].finish_reason == "length"
        assert len(tok(full, add_special_tokens=False)["input_ids"]) >= n - 5 and full.startswith(text)
        r = admin.post("/v1/unload_lora_adapter", json={"lora_name": "sql"})
        assert r.status_code == 404
        # loaded again (a new id), it serves the same tokens
        r = admin.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": adapters["good"]})
        assert r.status_code == 200, r.text
        assert client.completions.create(model="sql", prompt=PROMPT, max_tokens=8, **GREEDY).choices[0].text == text
    finally:
        srv.stop()


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_endpoints_are_off_without_their_flags_in_process(smol_tokenizer_model, adapters):
    """Core as a thread of the server: without --lora-allowed-paths (or without LoRA at all) the endpoints refuse,
    naming the flag; with them, an adapter loaded here is listed and served."""
    torch.set_num_threads(1)
    engine = AsyncLLM(model=smol_tokenizer_model, enable_lora=True, max_lora_rank=8, **ENGINE_KWARGS)
    try:
        body = {"lora_name": "sql", "lora_path": adapters["good"]}
        r = TestClient(build_app(engine, "tiny")).post("/v1/load_lora_adapter", json=body)
        assert r.status_code == 403 and "--lora-allowed-paths" in r.json()["error"]["message"]
        client = TestClient(build_app(engine, "tiny", lora_allowed_paths=[adapters["root"]]))
        assert client.post("/v1/load_lora_adapter", json=body).status_code == 200
        assert [c["id"] for c in client.get("/v1/models").json()["data"]] == ["tiny", "sql"]
        # vLLM's load_inplace: a bad replacement leaves the loaded adapter in place; a good one takes its name
        r = client.post("/v1/load_lora_adapter", json={**body, "lora_path": adapters["nan"], "load_inplace": True})
        assert r.status_code == 400 and "not finite" in r.json()["error"]["message"]
        assert client.post("/v1/load_lora_adapter", json={**body, "load_inplace": True}).status_code == 200
        assert [c["id"] for c in client.get("/v1/models").json()["data"]] == ["tiny", "sql"]
        r = client.post("/v1/completions", json={"model": "sql", "prompt": PROMPT, "max_tokens": 8,
                                                 "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        want = merged_greedy(smol_tokenizer_model, adapters["good"], PROMPT, 8)
        assert r.json()["choices"][0]["text"] == engine.get_tokenizer().decode(want)
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}).status_code == 200
        r = client.post("/v1/completions", json={"model": "sql", "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 404
    finally:
        engine.shutdown()
    engine = AsyncLLM(model=smol_tokenizer_model, **ENGINE_KWARGS)
    try:
        client = TestClient(build_app(engine, "tiny", lora_allowed_paths=[adapters["root"]]))
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": adapters["good"]})
        assert r.status_code == 400 and "--enable-lora" in r.json()["error"]["message"]
    finally:
        engine.shutdown()


def test_llm_add_remove_list_loras(tiny_llama, tmp_path):
    torch.set_num_threads(1)
    good = build_adapter(tiny_llama, str(tmp_path / "good"), 4, 8, ["q_proj", "v_proj"], False, seed=5)
    other = build_adapter(tiny_llama, str(tmp_path / "other"), 4, 8, ["q_proj"], False, seed=6)
    prompt = {"prompt_token_ids": PROMPT}
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    with LLM(model=tiny_llama, enable_lora=True, max_lora_rank=8, **ENGINE_KWARGS) as llm:
        assert llm.list_loras() == set()
        lora = LoRARequest("good", 1, good)
        assert llm.add_lora(lora) is True and llm.add_lora(lora) is False
        assert llm.list_loras() == {1}
        got = llm.generate(prompt, params, lora_request="good")[0].outputs[0].token_ids
        assert got == merged_greedy(tiny_llama, good, PROMPT, 6)
        with pytest.raises(LoRAError, match="loaded already"):
            llm.add_lora(LoRARequest("good", 2, other))
        with pytest.raises(LoRAError, match="lora_int_id 1 already names"):
            llm.add_lora(LoRARequest("other", 1, other))
        assert llm.remove_lora(1) is True and llm.remove_lora(1) is False and llm.list_loras() == set()
        out = llm.generate(prompt, params, lora_request=lora)[0]
        assert out.error is not None and "was removed" in out.error
        with pytest.raises(LoRAError, match="ids are never reused"):
            llm.add_lora(LoRARequest("other", 1, other))
        assert llm.add_lora(lora) is True  # the same adapter may come back
        assert llm.generate(prompt, params, lora_request=lora)[0].outputs[0].token_ids == got
        assert llm.remove_lora("good") is True
    with LLM(model=tiny_llama, **ENGINE_KWARGS) as llm:
        with pytest.raises(LoRAError, match="enable-lora"):
            llm.add_lora(LoRARequest("good", 1, good))
