"""Loading checks (issue 10, example 7): config.json is checked against the weights on disk and against memory
before anything is allocated; absurd dimensions give a clear LoadError."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.gguf_fixtures import model_zoo
from weavelm import LLM
from weavelm.core.model_size import ModelSize, available_memory, check_checkpoint, check_model_size
from weavelm.errors import ConfigError, LoadError

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072)
LLAMA3_8B_PARAMS = 8_030_261_248


def with_config(src: str, dst, **changes) -> str:
    """A copy of the model directory `src` whose config.json has `changes` applied."""
    shutil.copytree(src, dst)
    cfg_file = dst / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(changes)
    cfg_file.write_text(json.dumps(cfg))
    return str(dst)


def engine(path: str, **kw) -> LLM:
    return LLM(model=path, device="cpu", dtype="float32", attention="torch_ref", **kw)


def test_8b_config_beside_tiny_checkpoint_fails_under_a_memory_limit(tiny_llama, tmp_path):
    """Under an address-space limit 1.5 GiB above the imported engine, an 8B fp32 model (32 GB) could never be
    allocated; the LoadError comes first, naming both counts."""
    path = with_config(tiny_llama, tmp_path / "m", **LLAMA3_8B)
    code = f"""
import resource, torch, transformers
from weavelm import LLM
from weavelm.errors import LoadError
size = next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (size + (3 << 29), resource.RLIM_INFINITY))
try:
    LLM(model={path!r}, device="cpu", dtype="float32", attention="torch_ref")
except LoadError as e:
    print("LoadError:", e)
try:
    torch.empty(1 << 31)
except RuntimeError:
    print("limit holds: 8 GiB cannot be allocated")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"LoadError: {path}: config.json does not match the weights: it describes {LLAMA3_8B_PARAMS:,} " \
           f"parameters but the checkpoint holds 139,584 elements" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "limit holds" in proc.stdout


@pytest.mark.parametrize("changes, text", [
    ({"hidden_size": 10**9}, "hidden_size must be an integer in 1..1048576 (got 1000000000)"),
    ({"vocab_size": -5}, "vocab_size must be an integer in 1..16777216 (got -5)"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be an integer in 1..4096 (got 0)"),
    ({"max_position_embeddings": 1 << 24, "head_dim": 1024},
     "max_position_embeddings x head_dim = 16777216 x 1024 exceeds 1073741824"),
])
def test_absurd_dimensions_give_a_clear_error(tiny_llama, tmp_path, changes, text):
    path = with_config(tiny_llama, tmp_path / "m", **changes)
    with pytest.raises(LoadError) as e:
        engine(path)
    assert f"{path}/config.json: " in str(e.value) and text in str(e.value)


def test_float_dimension_is_refused_when_config_is_read(tiny_llama, tmp_path):
    path = with_config(tiny_llama, tmp_path / "m", hidden_size=1e9)
    with pytest.raises(LoadError, match="cannot be read as a transformers config.*hidden_size"):
        engine(path)


def test_architectures_must_be_a_list(tiny_llama, tmp_path):
    path = with_config(tiny_llama, tmp_path / "m", architectures="LlamaForCausalLM")
    with pytest.raises((ConfigError, LoadError), match="`architectures` must be a list of strings") as e:
        engine(path)
    assert "'L'" not in str(e.value)


def test_dummy_loader_checks_memory(tiny_llama, tmp_path):
    huge = dict(vocab_size=256000, hidden_size=16384, intermediate_size=65536, num_hidden_layers=256,
                num_attention_heads=128, num_key_value_heads=128, head_dim=128, max_position_embeddings=4096)
    path = with_config(tiny_llama, tmp_path / "m", **huge)
    with pytest.raises(LoadError) as e:
        engine(path, loader="dummy")
    msg = str(e.value)
    assert f"{path}: the model (1,107,908,640,768 parameters in torch.float32) needs 4,12" in msg
    assert "GiB (" in msg and "bytes) is available on cpu" in msg


def test_dummy_loader_still_builds_a_model_that_fits(tiny_llama):
    out = engine(tiny_llama, loader="dummy").generate([[1, 2, 3]])[0]
    assert out.error is None and len(out.outputs[0].token_ids) > 0


@pytest.mark.parametrize("fmt, loader_name", [
    ("safetensors", "safetensors"), ("safetensors_sharded", "safetensors"), ("pt", "pt"), ("pt_sharded", "pt"),
    ("tensorizer", "tensorizer"), ("gguf_Q4_K", "gguf"), ("convert_gguf_Q8_0", "gguf")])
def test_checkpoint_elements_equal_model_parameters(fmt, loader_name):
    from weavelm.core.registry import Registry

    path = model_zoo("llama")[fmt]
    registry = Registry.load()
    loader_cls = registry.get("loader", loader_name)
    loader = loader_cls(loader_cls.Options())
    hf_config = loader.load_hf_config(path)
    model_cls = registry.find_model(hf_config.architectures[0])
    size = check_model_size(model_cls, hf_config, torch.float32, torch.device("cpu"), loader, path)
    assert loader.checkpoint_num_elements(path) == size.num_params == 1_377_536
    assert size.num_bytes >= size.num_params * 4


def test_checkpoint_count_tolerates_tied_embeddings_and_leaves_small_gaps_to_the_load():
    size = ModelSize(num_params=1000, num_bytes=4000, tied_embedding_params=200)
    for elements in (None, 1000, 1200, 700, 1700):  # 700: a missing tensor, named by the load's own checks
        check_checkpoint(size, elements, "m")
    for elements in (600, 1900):
        with pytest.raises(LoadError, match=f"describes 1,000 parameters but the checkpoint holds {elements:,}"):
            check_checkpoint(size, elements, "m")


def test_available_memory_on_cpu_is_known():
    free = available_memory(torch.device("cpu"))
    assert free is not None and 0 < free < 1 << 50
