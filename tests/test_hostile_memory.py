"""Hostile probe, round 2, item 6: sizes inside the validated limits that cannot fit this machine's memory
(max_position_embeddings 2**24, cache.num_blocks 2**24, cpu_kv_cache_gib 1000) are a ConfigError naming the number
and the memory available, checked before allocating, not a raw MemoryError from numpy or torch."""

import json
import math
import os
import shutil

import psutil
import pytest

from weavelm import LLM
from weavelm.errors import ConfigError

KW = dict(dtype="float32", device="cpu", loader="safetensors")


def _seqs_to_overflow(row_bytes: int) -> int:
    """max_num_seqs that makes rows of `row_bytes` at least twice the available memory (256 on most machines)."""
    return max(256, math.ceil(2 * psutil.virtual_memory().available / row_bytes))


def test_huge_max_position_embeddings(tiny_llama, tmp_path):
    model = str(tmp_path / "long")
    shutil.copytree(tiny_llama, model)
    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    cfg["max_position_embeddings"] = 2 ** 24
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(cfg, f)
    seqs = _seqs_to_overflow((2 ** 24 + 1) * 8)
    with pytest.raises(ConfigError, match=r"max_model_len=16777216 .* GiB available"):
        LLM(model=model, cache={"num_blocks": 64}, scheduler={"max_num_seqs": seqs}, **KW)


@pytest.mark.parametrize("cache, pattern", [({"num_blocks": 2 ** 24}, r"cache.num_blocks=16777216 .* GiB available"),
                                            ({"cpu_kv_cache_gib": 1000}, r"cpu_kv_cache_gib=1000 .* GiB available")])
def test_huge_kv_caches(tiny_llama, cache, pattern):
    if psutil.virtual_memory().available > 500 * 2 ** 30:
        pytest.skip("this machine has the memory for these caches")
    with pytest.raises(ConfigError, match=pattern):
        LLM(model=tiny_llama, cache=cache, **KW)
