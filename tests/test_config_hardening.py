"""Config edge cases (issue 10, example 8): malformed --set, YAML aliases, values that would only fail at build."""

from __future__ import annotations

import pytest

from weavelm.cli import main
from weavelm.core.config import EngineConfig, merge_overrides, read_yaml
from weavelm.errors import ConfigError

# About 400 bytes: nine levels of nine aliases each, 9**9 "lol"s once expanded (issue 10's was 431 bytes).
BILLION_LAUGHS = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['lol'] * 9)}]\n"
    for prev, name in zip([None, *"abcdefgh"], "abcdefghi"))


def test_set_with_malformed_yaml_names_the_item():
    with pytest.raises(ConfigError) as e:
        merge_overrides({}, sets=["scheduler.max_num_seqs=[8"])
    assert e.value.errors[0][0] == "scheduler.max_num_seqs"
    assert "--set 'scheduler.max_num_seqs=[8': not valid YAML (expected ',' or ']'" in str(e.value)
    assert "line 1, column 3" in str(e.value)


def test_set_needs_a_key():
    with pytest.raises(ConfigError, match="--set needs a dotted key"):
        merge_overrides({}, sets=["=8"])
    with pytest.raises(ConfigError, match="--set needs a dotted key"):
        merge_overrides({}, sets=["scheduler..max_num_seqs=8"])


def test_yaml_aliases_are_refused_with_a_short_message(tmp_path):
    f = tmp_path / "laughs.yaml"
    f.write_text(BILLION_LAUGHS)
    with pytest.raises(ConfigError) as e:
        read_yaml(str(f))
    msg = str(e.value)
    assert f"{f}: not valid YAML (found alias *a at line 2, column 8; anchors and aliases are not allowed" in msg
    assert len(msg) < 300


def test_set_value_cannot_use_aliases_or_nest_deeply():
    with pytest.raises(ConfigError, match=r"found alias \*x"):
        merge_overrides({}, sets=["scheduler.max_num_seqs=*x"])
    deep = "[" * 1000 + "]" * 1000
    with pytest.raises(ConfigError, match="nested deeper than 64 levels") as e:
        merge_overrides({}, sets=[f"lora.a={deep}"])
    assert len(str(e.value)) < 500
    assert merge_overrides({}, sets=["lora.a=&anchor_only 5"]) == {"lora": {"a": 5}}


def test_echoed_values_are_bounded():
    with pytest.raises(ConfigError) as e:
        EngineConfig.build({"model": ["x" * 100_000] * 1000, "seed": "y" * 100_000})
    assert "model: Input should be a valid string (got ['xxx" in str(e.value)
    assert len(str(e.value)) < 600


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_cpu_kv_cache_gib_must_be_finite(value):
    with pytest.raises(ConfigError, match=r"cache.cpu_kv_cache_gib: Input should be a finite number \(got (inf|nan)\)"):
        EngineConfig.build({"cache": {"cpu_kv_cache_gib": value}})


def test_yaml_inf_is_refused(tmp_path):
    f = tmp_path / "e.yaml"
    f.write_text("cache:\n  cpu_kv_cache_gib: .inf\n")
    with pytest.raises(ConfigError, match="cache.cpu_kv_cache_gib: Input should be a finite number"):
        EngineConfig.from_yaml(str(f))


@pytest.mark.parametrize("raw, path, bound", [
    ({"scheduler": {"max_num_seqs": 10**9}}, "scheduler.max_num_seqs", "8192"),
    ({"scheduler": {"max_num_batched_tokens": 10**9}}, "scheduler.max_num_batched_tokens", "1048576"),
    ({"scheduler": {"name": "priority", "max_num_seqs": 10**9}}, "scheduler.max_num_seqs", "8192"),
    ({"cache": {"num_blocks": 10**12}}, "cache.num_blocks", "16777216"),
    ({"cache": {"cpu_kv_cache_gib": 1e9}}, "cache.cpu_kv_cache_gib", "4096"),
    ({"cache": {"block_size": 4096}}, "cache.block_size", "1024"),
    ({"max_model_len": 10**12}, "max_model_len", "16777216"),
    ({"seed": 2**64}, "seed", "9223372036854775807"),
])
def test_values_that_cannot_be_built_fail_at_validation(raw, path, bound):
    with pytest.raises(ConfigError, match=f"{path}: Input should be less than or equal to {bound}"):
        EngineConfig.build(raw)


def test_seed_range_is_int64():
    assert EngineConfig.build({"seed": -(2**63)}).seed == -(2**63)
    with pytest.raises(ConfigError, match="seed: Input should be greater than or equal to"):
        EngineConfig.build({"seed": -(2**63) - 1})


@pytest.mark.parametrize("argv, text", [
    (["generate", "--set", "scheduler.max_num_seqs=[8"], "scheduler.max_num_seqs: --set"),
    (["generate", "--set", "cache.cpu_kv_cache_gib=.inf"], "cache.cpu_kv_cache_gib: Input should be a finite"),
    (["bench", "throughput", "--set", "scheduler.max_num_seqs=1000000000"], "scheduler.max_num_seqs:"),
])
def test_cli_config_errors_exit_2_without_traceback(argv, text, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err


def test_cli_aliases_in_config_file_exit_2(tmp_path, capsys):
    f = tmp_path / "laughs.yaml"
    f.write_text(BILLION_LAUGHS)
    assert main(["generate", "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert "found alias *a" in err and "Traceback" not in err
    assert len(err) < 1000
