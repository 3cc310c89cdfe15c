"""One tiny model per architecture, saved by transformers and rewritten in every weight format the loaders read.

Built once per test process in a temporary directory. Hidden size 256 (not the usual 64) because Q4_K quantizes
rows in 256-value super-blocks: with 64-wide rows llama.cpp would fall back to another type and the Q4_K path
would go untested. 16 heads of 16 keep o_proj's rows 256 wide too.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import torch

from tests.gguf_writer_util import write_llama_cpp_gguf
from tests.model_fixtures import build_tiny_model

ARCHS = ("llama", "qwen2", "qwen3")
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=16, num_key_value_heads=4,
             initializer_range=0.08)
LOSSLESS = ("safetensors", "safetensors_sharded", "pt", "pt_sharded", "tensorizer", "gguf_F32",
            "convert_gguf_F32")
QUANTIZED = ("gguf_Q8_0", "gguf_Q4_K", "convert_gguf_Q8_0")
FORMATS = LOSSLESS + ("gguf_F16", "convert_gguf_F16") + QUANTIZED
LOADER_OF = {"safetensors": "safetensors", "safetensors_sharded": "safetensors", "pt": "pt", "pt_sharded": "pt",
             "tensorizer": "tensorizer"}
SHARD = 600_000  # bytes: several shards for the ~6 MB fp32 model

_root: str | None = None
_zoo: dict[str, dict[str, str]] = {}


def loader_of(fmt: str) -> str:
    return LOADER_OF.get(fmt, "gguf")


def root() -> str:
    global _root
    if _root is None:
        _root = tempfile.mkdtemp(prefix="weavelm-loaders-")
        atexit.register(shutil.rmtree, _root, True)
    return _root


def state_dict(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def reference_of(zoo: dict[str, str], fmt: str) -> str:
    """The safetensors model a format's weights must equal (F16 GGUF files hold the float16 copy)."""
    return zoo["f16"] if "F16" in fmt else zoo["safetensors"]


def model_zoo(arch: str) -> dict[str, str]:
    """format -> path of the same weights: safetensors, sharded, pt, tensorizer, GGUF F32/F16/Q8_0/Q4_K (llama.cpp
    layout via gguf_writer_util) and `convert_gguf_*` (written by `weavelm convert`); plus "f16", the float16
    safetensors copy."""
    if arch in _zoo:
        return _zoo[arch]
    from transformers import AutoConfig

    from weavelm.convert import convert

    base = os.path.join(root(), arch)
    src = build_tiny_model(arch, os.path.join(base, "safetensors"), seed=ARCHS.index(arch) + 11, **SHAPE)
    cfg = AutoConfig.from_pretrained(src)
    zoo = {"safetensors": src,
           "safetensors_sharded": os.path.join(base, "safetensors_sharded"),
           "pt": os.path.join(base, "pt"), "pt_sharded": os.path.join(base, "pt_sharded"),
           "tensorizer": os.path.join(base, "tensorizer"), "f16": os.path.join(base, "f16")}
    convert(src, zoo["safetensors_sharded"], "safetensors", shard_size=SHARD)
    convert(src, zoo["pt"], "pt")
    convert(src, zoo["pt_sharded"], "pt", shard_size=SHARD)
    convert(src, zoo["tensorizer"], "tensorizer")
    convert(src, zoo["f16"], "safetensors", dtype="float16")
    sd, sd16 = state_dict(src), state_dict(zoo["f16"])
    for q in ("F32", "F16", "Q8_0", "Q4_K"):
        zoo[f"gguf_{q}"] = write_llama_cpp_gguf(os.path.join(base, f"llama-cpp-{q}.gguf"), cfg,
                                                sd16 if q == "F16" else sd, q)
    for q in ("F32", "F16", "Q8_0"):
        zoo[f"convert_gguf_{q}"] = convert(zoo["f16"] if q == "F16" else src,
                                           os.path.join(base, f"convert-{q}.gguf"), "gguf", q)
    _zoo[arch] = zoo
    return zoo
