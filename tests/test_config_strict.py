"""Strict engine configs (issue 24's leftovers): no value is coerced into another type, a YAML key written twice is
an error, a KV pool that cannot hold one request is refused at startup, the prompt-length error names the KV cache
when the cache is what caps `max_model_len`, and rope-scaling values no model can run with are refused at load."""

from __future__ import annotations

import json
import os

import pytest

from tests.model_fixtures import build_tiny_model
from weavelm import LLM
from weavelm.core.config import EngineConfig, merge_overrides
from weavelm.errors import ConfigError, LoadError


def _errors(raw: dict) -> str:
    with pytest.raises(ConfigError) as e:
        EngineConfig.build(raw)
    return str(e.value)


def test_yaml_boolean_is_not_a_count(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("scheduler: {name: fcfs, max_num_seqs: true}\n")
    with pytest.raises(ConfigError) as e:
        EngineConfig.from_yaml(str(path))
    assert "scheduler.max_num_seqs" in str(e.value) and "valid integer" in str(e.value)


@pytest.mark.parametrize("raw,where", [
    ({"max_model_len": True}, "max_model_len"),
    ({"seed": "3"}, "seed"),
    ({"enforce_eager": "yes"}, "enforce_eager"),
    ({"cache": {"num_blocks": "64"}}, "cache.num_blocks"),
    ({"cache": {"enable_prefix_caching": 1}}, "cache.enable_prefix_caching"),
    ({"num_threads": 2.0}, "num_threads"),
    ({"kernels": {"native": "off"}}, "kernels.native"),
])
def test_top_level_and_sections_are_strict(raw, where):
    assert where in _errors(raw)


def test_num_speculative_tokens_string_is_refused():
    text = _errors({"speculative": {"name": "ngram", "num_speculative_tokens": "4"}})
    assert "speculative.num_speculative_tokens" in text and "'4'" in text


def test_set_still_parses_numbers():
    """`--set` values are YAML, so `--set scheduler.max_num_seqs=8` stays an int, and a float field takes an int."""
    config = EngineConfig.build(merge_overrides({}, sets=["scheduler.max_num_seqs=8", "cache.cpu_kv_cache_gib=1"]))
    assert config.scheduler.max_num_seqs == 8 and config.cache.cpu_kv_cache_gib == 1.0


def test_duplicate_yaml_key_names_key_and_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("dtype: float32\nscheduler:\n  name: fcfs\n  max_num_seqs: 4\n  max_num_seqs: 8\n")
    with pytest.raises(ConfigError) as e:
        EngineConfig.from_yaml(str(path))
    text = str(e.value)
    assert "duplicate key 'max_num_seqs' (first at line 4) at line 5" in text and str(path) in text


def test_duplicate_top_level_key_in_set_value():
    with pytest.raises(ConfigError, match="duplicate key 'name'"):
        merge_overrides({}, sets=["scheduler={name: fcfs, name: priority}"])


def test_kv_pool_too_small_for_any_request_is_refused():
    text = _errors({"cache": {"num_blocks": 1, "block_size": 1}})
    assert "cache:" in text and "num_blocks x block_size = 1 token slots" in text
    EngineConfig.build({"cache": {"num_blocks": 1, "block_size": 2}})  # one prompt token and one output: fine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return build_tiny_model("llama", str(tmp_path_factory.mktemp("strict") / "llama"), seed=3)


def test_prompt_error_names_the_kv_cache_when_it_caps_max_model_len(tiny, one_torch_thread):
    llm = LLM(model=tiny, dtype="float32", device="cpu", cache={"num_blocks": 2, "block_size": 4})
    try:
        text = llm.generate([{"prompt_token_ids": list(range(3, 13))}])[0].error
        assert "max_model_len is 8" in text and "grow the KV cache" in text and "model's 512" in text
        assert "raise max_model_len" not in text
    finally:
        llm.shutdown()


def test_prompt_error_says_raise_max_model_len_when_configured_short(tiny, one_torch_thread):
    llm = LLM(model=tiny, dtype="float32", device="cpu", max_model_len=8)
    try:
        text = llm.generate([{"prompt_token_ids": list(range(3, 13))}])[0].error
        assert "max_model_len is 8" in text and "shorten the prompt or raise max_model_len" in text
    finally:
        llm.shutdown()


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": -1.0},
                                  {"rope_type": "dynamic", "factor": float("nan")},
                                  {"rope_type": "linear", "factor": True}])
def test_bad_rope_scaling_is_refused_at_load(tiny, tmp_path, rope):
    import shutil

    bad = tmp_path / "bad_rope"
    shutil.copytree(tiny, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = rope
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError) as e:
        LLM(model=str(bad), dtype="float32", device="cpu")
    assert "factor must be a finite number >= 1" in str(e.value) and os.path.join(str(bad), "config.json") in \
        str(e.value)


def test_kernels_and_num_threads_reach_the_model_process(tiny, one_torch_thread):
    """`kernels:` and `num_threads` are config values handed to the runner's process (here the caller's: uniproc)."""
    import torch

    from weavelm.ops import native, settings

    with LLM(model=tiny, dtype="float32", device="cpu", kernels={"native": False}, num_threads=2) as llm:
        assert settings.active().native is False and not native.available()
        assert "kernels: {native: false}" in native.unavailable_reason()
        assert torch.get_num_threads() == 2
        assert llm.generate([[5, 6, 7]])[0].error is None
    torch.set_num_threads(1)
    with LLM(model=tiny, dtype="float32", device="cpu", num_threads=1):
        assert settings.active().native is True and torch.get_num_threads() == 1
