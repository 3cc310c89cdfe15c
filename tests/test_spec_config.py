"""The `speculative:` section: absent means off, its options are validated by the chosen proposer's `Options`, and
errors name the YAML path."""

import pytest

from weavelm.core.config import EngineConfig
from weavelm.core.registry import Registry
from weavelm.errors import ConfigError


def _errors(raw: dict) -> str:
    with pytest.raises(ConfigError) as e:
        EngineConfig.build(raw)
    return str(e.value)


def test_absent_section_means_no_speculation():
    cfg = EngineConfig.build({})
    assert cfg.speculative is None and "speculative" not in cfg.to_dict()


def test_ngram_and_draft_model_sections_validate():
    cfg = EngineConfig.build({"speculative": {"name": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}})
    assert cfg.speculative.name == "ngram" and cfg.speculative.num_speculative_tokens == 3
    assert cfg.to_dict()["speculative"] == {"name": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                            "prompt_lookup_max": 5}
    cfg = EngineConfig.build({"speculative": {"name": "draft_model", "num_speculative_tokens": 2, "model": "/m",
                                              "dtype": "bfloat16"}})
    assert cfg.speculative.options.model == "/m" and cfg.speculative.options.dtype == "bfloat16"


def test_errors_name_the_yaml_path():
    assert "speculative.name: unknown" in _errors({"speculative": {"name": "ngarm", "num_speculative_tokens": 2}})
    assert "ngram" in _errors({"speculative": {"name": "ngarm", "num_speculative_tokens": 2}})
    assert "speculative.name: missing" in _errors({"speculative": {"num_speculative_tokens": 2}})
    assert "speculative.num_speculative_tokens: Field required" in _errors({"speculative": "ngram"})
    assert "speculative.num_speculative_tokens" in _errors({"speculative": {"name": "ngram",
                                                                             "num_speculative_tokens": 0}})
    assert "speculative.model: Field required" in _errors({"speculative": {"name": "draft_model",
                                                                           "num_speculative_tokens": 2}})
    assert "prompt_lookup_min (5) must be <= prompt_lookup_max (2)" in _errors(
        {"speculative": {"name": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5,
                         "prompt_lookup_max": 2}})
    assert "speculative.prompt_lookup: unknown option" in _errors(
        {"speculative": {"name": "ngram", "num_speculative_tokens": 2, "prompt_lookup": 2}})


def test_builtin_proposers_are_registered_through_entry_points():
    registry = Registry.load()
    assert {"ngram", "draft_model"} <= set(registry.classes("proposer"))


def test_draft_with_another_vocabulary_is_refused(tiny_llama, tmp_path):
    from tests.model_fixtures import build_tiny_model
    from weavelm import LLM

    draft = build_tiny_model("llama", str(tmp_path / "big_vocab"), vocab_size=600)
    with pytest.raises(ConfigError, match="speculative.model: the draft's vocabulary \\(600\\) is larger"):
        LLM(model=tiny_llama, dtype="float32", device="cpu", cache={"num_blocks": 32},
            speculative={"name": "draft_model", "num_speculative_tokens": 2, "model": draft})


def test_vllm_speculative_config_ports():
    from weavelm.core.compat import apply_vllm_aliases

    raw = apply_vllm_aliases({"speculative_config": {"method": "ngram", "num_speculative_tokens": 4,
                                                     "prompt_lookup_max": 3}})
    assert raw == {"speculative": {"name": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}}
    raw = apply_vllm_aliases({"speculative_config": {"model": "/draft", "num_speculative_tokens": 2}})
    assert EngineConfig.build(raw).speculative.name == "draft_model"
    with pytest.raises(ConfigError, match="speculative_config: needs a `method`"):
        apply_vllm_aliases({"speculative_config": {"num_speculative_tokens": 2}})
    with pytest.raises(ConfigError, match="give one of them"):
        apply_vllm_aliases({"speculative_config": {"method": "ngram"}, "speculative": "ngram"})
