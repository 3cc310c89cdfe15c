"""Writing GGUF the way llama.cpp's `convert_hf_to_gguf.py` does: its tensor names, its Q/K permutation, its
metadata keys, 1-D tensors and norms kept in F32, and a GPT-2 style BPE tokenizer in the metadata when one is there.
Used by `weavelm convert --to gguf` (F32, F16, Q8_0).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weavelm.errors import LoadError
from weavelm.plugins.loaders import gguf_layout as layout

logger = logging.getLogger("weavelm.convert")
OUT_TYPES = ("F32", "F16", "Q8_0")


def tensor_type(out_type: str, name: str, shape: tuple[int, ...]) -> str:
    """llama.cpp's choice: 1-D tensors and norms stay F32; Q8_0 falls back to F16 for rows not a multiple of 32."""
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return "F32"
    if out_type == "Q8_0" and shape[-1] % 32:
        return "F16"
    return out_type


def encode(array: np.ndarray, qtype_name: str) -> tuple[np.ndarray, Any]:
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    if qtype_name == "F32":
        return array.astype(np.float32), None
    if qtype_name == "F16":
        return array.astype(np.float16), None
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def add_tokenizer(writer: Any, folder: str | None, vocab_size: int) -> bool:
    """Tokenizer metadata (`tokenizer.ggml.*`) for a byte-level BPE tokenizer in `folder`, as llama.cpp's
    `_set_vocab_gpt2` writes it. Returns False (and writes nothing) when there is no such tokenizer."""
    import gguf

    if not folder or not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return False
    with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    if spec.get("model", {}).get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        logger.warning("%s: tokenizer is not byte-level BPE; the GGUF gets no tokenizer metadata", folder)
        return False
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.get_added_vocab()
    decoder = getattr(tok, "added_tokens_decoder", {})
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.USER_DEFINED)
        elif reverse[i] in added:
            tokens.append(reverse[i])
            special = decoder[i].special if i in decoder else True
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    pre = (spec.get("pre_tokenizer") or {}).get("type")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2" if pre == "ByteLevel" else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(Path(folder), load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
    return True


def write_gguf(file: str, cfg: Any, weights: Iterable[tuple[str, torch.Tensor]], out_type: str = "F16",
               tokenizer_dir: str | None = None, name: str = "model") -> str:
    """Write `weights` (Hugging Face names) of a llama / mistral / qwen2 / qwen3 model to a GGUF file."""
    import gguf

    if out_type not in OUT_TYPES:
        raise LoadError(f"--gguf-type: {out_type!r} is not supported; choose one of {', '.join(OUT_TYPES)}")
    arch = layout.HF_TO_ARCH.get(getattr(cfg, "model_type", ""))
    if arch is None:
        raise LoadError(f"convert: model type {cfg.model_type!r} cannot be written to GGUF; supported: "
                        f"{', '.join(layout.HF_TO_ARCH)}")
    writer = gguf.GGUFWriter(file, arch)
    writer.add_type("model")
    layout.write_metadata(writer, cfg, arch, name)
    writer.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                          "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type])
    if out_type == "Q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer_dir, cfg.vocab_size)
    for hf_name, tensor in weights:
        if hf_name == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False):
            continue  # llama.cpp writes no output.weight for tied embeddings
        gguf_name = layout.hf_to_gguf_name(hf_name)
        if gguf_name is None:
            raise LoadError(f"convert: tensor {hf_name!r} has no llama.cpp {arch} name")
        n_head = layout.qk_heads(arch, hf_name, cfg)
        if n_head is not None:
            tensor = layout.permute(tensor, n_head)
        array = tensor.detach().to(torch.float32).numpy()
        data, raw = encode(array, tensor_type(out_type, gguf_name, array.shape))
        writer.add_tensor(gguf_name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return file
