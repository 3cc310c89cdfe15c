"""Where users meet LoRA: the server lists configured adapters in /v1/models and runs one when a request names
it as `model`; `weavelm generate --lora NAME=PATH` runs the prompts on it; an unknown name is a typed error."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from tests.lora_fixtures import build_adapter, merged_greedy
from tests.serve_utils import ENGINE_KWARGS
from weavelm import LLM, SamplingParams
from weavelm.core.async_llm import AsyncLLM
from weavelm.serve.app import build_app

PROMPT = [5, 17, 33, 8, 99, 4, 250]


@pytest.fixture(scope="module")
def adapter(smol_tokenizer_model, tmp_path_factory):
    return build_adapter(smol_tokenizer_model, str(tmp_path_factory.mktemp("lora_serve") / "sql"), 4, 8,
                         ["q_proj", "v_proj", "down_proj"], False, seed=3)


def test_server_lists_adapters_and_selects_one_by_model_name(smol_tokenizer_model, adapter):
    torch.set_num_threads(1)
    engine = AsyncLLM(model=smol_tokenizer_model, lora={"max_lora_rank": 8, "adapters": {"sql": adapter}},
                      **ENGINE_KWARGS)
    try:
        client = TestClient(build_app(engine, "tiny"))
        cards = client.get("/v1/models").json()["data"]
        assert [(c["id"], c.get("parent"), c["root"]) for c in cards][1] == ("sql", "tiny", "sql")  # no paths
        assert cards[0]["id"] == "tiny"
        texts = {}
        for model in ("sql", "tiny"):
            r = client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8,
                                                     "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            texts[model] = r.json()["choices"][0]["text"]
        tok = engine.get_tokenizer()
        assert texts["sql"] == tok.decode(merged_greedy(smol_tokenizer_model, adapter, PROMPT, 8))
        assert texts["tiny"] == tok.decode(merged_greedy(smol_tokenizer_model, None, PROMPT, 8))
        assert texts["sql"] != texts["tiny"]
        r = client.post("/v1/completions", json={"model": "nope", "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 404 and "serves tiny, sql" in r.json()["error"]["message"]
    finally:
        engine.shutdown()


def test_cli_generate_with_lora(smol_tokenizer_model, adapter, capsys):
    from weavelm.cli import main

    args = ["generate", "--model", smol_tokenizer_model, "--dtype", "float32", "--device", "cpu",
            "--max-tokens", "6", "--prompt", "Hello"]
    assert main(args + ["--lora", f"sql={adapter}"]) == 0
    with_lora = capsys.readouterr().out
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert with_lora.startswith("Hello") and with_lora != plain
    with LLM(model=smol_tokenizer_model, dtype="float32", device="cpu",
             lora={"max_lora_rank": 8, "adapters": {"sql": adapter}}) as llm:
        text = llm.generate("Hello", SamplingParams(max_tokens=6, temperature=0), lora_request="sql")[0].outputs[0].text
    assert with_lora == "Hello" + text + "\n"
    assert main(args + ["--lora", "nosuch"]) == 2
    assert "this engine serves no adapters" in capsys.readouterr().err
