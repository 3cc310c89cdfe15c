"""Hostile probe, round 2, items 4 and 11: an adapter with NaN weights, an overflowing lora_alpha or a config rank
that disagrees with its tensors is refused with a LoRAError for that request only; configured adapters that can
never load stop the engine (and `weavelm serve`, exit 2) at startup; responses on an adapter name the adapter."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from tests.lora_fixtures import build_adapter
from tests.serve_utils import ENGINE_KWARGS
from weavelm import LLM, SamplingParams
from weavelm.core.async_llm import AsyncLLM
from weavelm.errors import LoRAError
from weavelm.lora.request import LoRARequest
from weavelm.serve.app import build_app

PROMPT = {"prompt_token_ids": [5, 17, 33, 8]}


@pytest.fixture(scope="module")
def good(tiny_llama, tmp_path_factory):
    return build_adapter(tiny_llama, str(tmp_path_factory.mktemp("hostile_lora") / "good"), 4, 8,
                         ["q_proj", "v_proj"], False, seed=5)


def _variant(good: str, root, name: str, tensors=None, config=None) -> str:
    path = str(root / name)
    shutil.copytree(good, path)
    if tensors is not None:
        weights = load_file(os.path.join(path, "adapter_model.safetensors"))
        save_file({k: tensors(k, v) for k, v in weights.items()}, os.path.join(path, "adapter_model.safetensors"))
    if config is not None:
        with open(os.path.join(path, "adapter_config.json")) as f:
            cfg = json.load(f)
        cfg.update(config)
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump(cfg, f)
    return path


@pytest.fixture(scope="module")
def bad(good, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_lora_bad")
    nan_b = _variant(good, root, "nan", tensors=lambda k, v: v.fill_(float("nan")) if "lora_B" in k else v)
    inf_a = _variant(good, root, "inf", tensors=lambda k, v: v.fill_(float("inf")) if "lora_A" in k else v)
    huge_alpha = _variant(good, root, "alpha", config={"lora_alpha": 1e308})
    wrong_rank = _variant(good, root, "rank", config={"r": 8})
    return {"nan": (nan_b, "not finite"), "inf": (inf_a, "not finite"), "alpha": (huge_alpha, "lora_alpha"),
            "rank": (wrong_rank, "rank")}


@pytest.fixture(scope="module")
def llm(tiny_llama, good):
    torch.set_num_threads(1)
    llm = LLM(model=tiny_llama, lora={"max_loras": 2, "max_lora_rank": 8, "adapters": {"good": good}},
              **ENGINE_KWARGS)
    yield llm
    llm.shutdown()


def test_bad_adapters_fail_their_request_only(llm, bad):
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    want = llm.generate([PROMPT], params, lora_request="good")[0].outputs[0].token_ids
    for i, (name, (path, reason)) in enumerate(bad.items()):
        outs = llm.generate([PROMPT, PROMPT], params, lora_request=[LoRARequest(name, 10 + i, path), "good"])
        failed, fine = outs
        assert failed.outputs[0].finish_reason == "error" and not failed.outputs[0].token_ids, failed
        assert "LoRA adapter" in str(failed.error) and reason in str(failed.error), failed.error
        assert fine.outputs[0].token_ids == want and fine.error is None


@pytest.mark.parametrize("which", ["nan", "rank"])
def test_configured_adapters_are_checked_at_startup(tiny_llama, good, bad, which):
    path, reason = bad[which]
    with pytest.raises(LoRAError, match=reason):
        LLM(model=tiny_llama, lora={"max_lora_rank": 8, "adapters": {"good": good, "broken": path}},
            **ENGINE_KWARGS)


def test_serve_exits_2_naming_a_broken_adapter(tiny_llama, tmp_path, capsys):
    from weavelm.cli import main

    code = main(["serve", "--model", tiny_llama, "--dtype", "float32", "--device", "cpu", "--set",
                 "loader=safetensors", "--set", "cache.num_blocks=64", "--port", "0",
                 "--lora-modules", f"missing={tmp_path / 'nowhere'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "missing" in err and "no such directory" in err


def test_responses_on_an_adapter_name_it(tiny_llama, good):
    engine = AsyncLLM(model=tiny_llama, lora={"max_loras": 2, "max_lora_rank": 8, "adapters": {"good": good}},
                      **ENGINE_KWARGS)
    try:
        with TestClient(build_app(engine, "tiny")) as http:
            for path, body in [("/v1/completions", {"prompt": PROMPT["prompt_token_ids"]}),
                               ("/v1/completions", {"prompt": PROMPT["prompt_token_ids"], "stream": True})]:
                r = http.post(path, json={**body, "model": "good", "max_tokens": 2})
                assert r.status_code == 200, r.text
                assert '"model":"good"' in r.text.replace(" ", "") and '"model":"tiny"' not in r.text
            r = http.post("/v1/completions", json={"prompt": PROMPT["prompt_token_ids"], "max_tokens": 2})
            assert r.json()["model"] == "tiny"
    finally:
        engine.shutdown()
