"""EngineConfig: YAML, keyword overrides, --set, two-phase validation, shipped examples."""

import glob
import os

import pytest

from weavelm.core.config import EngineConfig, merge_overrides
from weavelm.core.registry import Registry
from weavelm.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(__file__))


def test_bare_string_is_a_name_and_options_validate():
    cfg = EngineConfig.build({"scheduler": {"name": "priority", "max_num_seqs": 7}, "loader": "safetensors"})
    assert cfg.scheduler.name == "priority" and cfg.scheduler.options.max_num_seqs == 7
    assert cfg.scheduler.max_num_seqs == 7
    assert cfg.loader.name == "safetensors" and cfg.executor.name == "uniproc"


def test_set_overrides_yaml(tmp_path):
    f = tmp_path / "e.yaml"
    f.write_text("scheduler: fcfs\ncache: {block_size: 32}\n")
    cfg = EngineConfig.from_yaml(str(f), sets=["scheduler.max_num_seqs=3", "cache.block_size=8",
                                               "cache.enable_prefix_caching=false"])
    assert cfg.scheduler.name == "fcfs" and cfg.scheduler.max_num_seqs == 3
    assert cfg.cache.block_size == 8 and cfg.cache.enable_prefix_caching is False


def test_set_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="--set takes KEY=VALUE"):
        merge_overrides({}, None, ["scheduler.max_num_seqs"])


def test_section_without_name_uses_default():
    cfg = EngineConfig.build({"scheduler": {"max_num_seqs": 2}})
    assert cfg.scheduler.name == "fcfs"


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match="schedular: unknown option"):
        EngineConfig.build({"schedular": "fcfs"})


def test_yaml_cannot_name_import_paths():
    with pytest.raises(ConfigError, match="unknown scheduler plugin 'os.system'"):
        EngineConfig.build({"scheduler": "os.system"})


def test_bad_yaml_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("scheduler: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        EngineConfig.from_yaml(str(f))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "examples", "*.yaml"))))
def test_shipped_examples_validate(path):
    first = open(path).readline()
    assert first.startswith("#"), "every shipped YAML starts with a comment saying what it is for"
    if "shortest_prompt" in open(path).read() and "shortest_prompt" not in Registry.load().names("scheduler"):
        pytest.skip("example plugin not installed")
    EngineConfig.from_yaml(path)
