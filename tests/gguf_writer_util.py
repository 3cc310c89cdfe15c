"""Test fixtures: GGUF files written from a transformers model the way llama.cpp writes them.

Independent of weavelm's own writer on purpose, so the `gguf` loader is proven against llama.cpp's layout rather
than against ours: tensor names come from gguf-py's `TensorNameMap` (the table llama.cpp's converter uses), the
Q/K permutation is `LlamaModel.permute` from llama.cpp's `convert_hf_to_gguf.py`, and the metadata keys are
written with `GGUFWriter`'s llama.cpp key helpers.

Quantized types: gguf-py quantizes Q8_0 (and Q4_0/Q4_1/Q5_0/Q5_1) itself but has no Q4_K quantizer (its `Q4_K`
only dequantizes), so `quantize_q4_k` below is a numpy transcription of llama.cpp's `quantize_row_q4_K_ref`
(`ggml-quants.c`): per 256-value super-block, eight 32-value sub-blocks get a scale and a min from
`make_qkx2_quants` (weighted least squares over 20 candidate scales), those are quantized to 6 bits against the
super-block's fp16 `d` / `dmin`, and the 4-bit values are packed two per byte. Reading back goes through gguf-py's
own `dequantize`, so any packing mistake here would show as a large error in the tests.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

QK_K = 256


def permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp `LlamaModel.permute`, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int = 15, rmin: float = -1.0, rdelta: float = 0.1,
                     nstep: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised `make_qkx2_quants` over groups: x, w (G, 32) -> (scale (G,), -min (G,), L (G, 32))."""
    mn = np.minimum(x.min(-1), 0.0)
    mx = x.max(-1)
    sum_w, sum_x = w.sum(-1), (w * x).sum(-1)
    flat = mx == mn
    rng = np.where(flat, 1.0, mx - mn)
    iscale = nmax / rng
    scale = 1.0 / iscale
    L = np.clip(np.rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    best = (w * (scale[:, None] * L + mn[:, None] - x) ** 2).sum(-1)
    for step in range(nstep + 1):
        isc = (rmin + rdelta * step + nmax) / rng
        la = np.clip(np.rint(isc[:, None] * (x - mn[:, None])), 0, nmax)
        sl, sl2, sxl = (w * la).sum(-1), (w * la * la).sum(-1), (w * la * x).sum(-1)
        det = sum_w * sl2 - sl * sl
        ok = det > 0
        det = np.where(ok, det, 1.0)
        this_scale = (sum_w * sxl - sum_x * sl) / det
        this_min = (sl2 * sum_x - sl * sxl) / det
        pos = this_min > 0
        this_scale = np.where(pos, sxl / np.where(sl2 > 0, sl2, 1.0), this_scale)
        this_min = np.where(pos, 0.0, this_min)
        err = (w * (this_scale[:, None] * la + this_min[:, None] - x) ** 2).sum(-1)
        better = ok & (err < best)
        L = np.where(better[:, None], la, L)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    return np.where(flat, 0.0, scale), -mn, np.where(flat[:, None], 0, L)


def quantize_q4_k(data: np.ndarray) -> np.ndarray:
    """`quantize_row_q4_K_ref` for a (rows, cols) float array, cols % 256 == 0 -> (rows, cols // 256 * 144) uint8."""
    rows, cols = data.shape
    assert cols % QK_K == 0, "Q4_K needs rows that are a multiple of 256 values"
    x = data.astype(np.float32).reshape(-1, 8, 32)
    nb = x.shape[0]
    av_x = np.sqrt((x * x).sum(-1, keepdims=True) / 32)
    scales, mins, L = make_qkx2_quants(x.reshape(-1, 32), (av_x + np.abs(x)).reshape(-1, 32))
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 8, 32)
    max_scale, max_min = scales.max(-1), mins.max(-1)
    inv_scale = np.where(max_scale > 0, 63.0 / np.where(max_scale > 0, max_scale, 1), 0.0)
    inv_min = np.where(max_min > 0, 63.0 / np.where(max_min > 0, max_min, 1), 0.0)
    ls = np.minimum(63, np.rint(inv_scale[:, None] * scales)).astype(np.uint8)
    lm = np.minimum(63, np.rint(inv_min[:, None] * mins)).astype(np.uint8)
    packed = np.zeros((nb, 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, :4]
    packed[:, 4:8] = lm[:, :4]
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    packed[:, 0:4] |= (ls[:, 4:] >> 4) << 6
    packed[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    d = (max_scale / 63.0).astype(np.float16)
    dmin = (max_min / 63.0).astype(np.float16)
    # get_scale_min_k4 reads back exactly the 6-bit values packed above
    sub_d = d.astype(np.float32)[:, None] * ls
    sub_m = dmin.astype(np.float32)[:, None] * lm
    nonzero = sub_d != 0
    requant = np.clip(np.rint((x + sub_m[..., None]) / np.where(nonzero, sub_d, 1)[..., None]), 0, 15)
    L = np.where(nonzero[..., None], requant, L).astype(np.uint8).reshape(nb, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(nb, 128)
    out = np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), packed, qs], axis=1)
    return out.reshape(rows, cols // QK_K * 144)


def tensor_data(array: np.ndarray, qtype_name: str) -> tuple[np.ndarray, Any]:
    import gguf

    if qtype_name == "F32":
        return array.astype(np.float32), None
    if qtype_name == "F16":
        return array.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType[qtype_name]
    if qtype_name == "Q4_K":
        return quantize_q4_k(array), qtype
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def write_llama_cpp_gguf(path: str, cfg: Any, state_dict: dict[str, torch.Tensor], qtype: str = "F16", *,
                         drop: tuple[str, ...] = (), extra: dict[str, np.ndarray] | None = None,
                         force_types: dict[str, str] | None = None, tokenizer: Any = None) -> str:
    """Write `state_dict` (Hugging Face names) as llama.cpp would for `cfg` (llama / qwen2 / qwen3).

    `qtype`: F32, F16, Q8_0 or Q4_K for 2-D weights (1-D tensors and norms stay F32, as in llama.cpp).
    Test knobs: `drop` llama.cpp tensor names, add `extra` F32 tensors, `force_types` {gguf name: type} writes
    random bytes of that ggml type (for unsupported-type tests).
    """
    import gguf

    arch_name = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[cfg.model_type]
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}[arch_name]
    name_map = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads

    w = gguf.GGUFWriter(path, arch_name)
    w.add_type("model")
    w.add_name("weavelm-test")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch_name == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if arch_name == "llama":
        w.add_rope_dimension_count(head_dim)
    w.add_file_type({"F32": 0, "F16": 1, "Q8_0": 7, "Q4_K": 15}[qtype])  # LlamaFileType (Q4_K -> MOSTLY_Q4_K_M)
    if qtype not in ("F32", "F16"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer is not None:
        add_gpt2_vocab(w, tokenizer, cfg.vocab_size)

    for hf_name, tensor in state_dict.items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        new_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert new_name is not None, hf_name
        if new_name in drop:
            continue
        if arch_name == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = permute(tensor, heads, heads)
        if arch_name == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = permute(tensor, heads, kv_heads)
        array = tensor.detach().float().numpy()
        if new_name in (force_types or {}):
            add_random_raw(w, new_name, array.shape, force_types[new_name])
            continue
        kind = "F32" if array.ndim <= 1 or new_name.endswith("_norm.weight") else qtype
        data, raw = tensor_data(array, kind)
        w.add_tensor(new_name, data, raw_dtype=raw)
    for name, array in (extra or {}).items():
        w.add_tensor(name, array.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def add_random_raw(writer: Any, name: str, shape: tuple[int, ...], type_name: str) -> None:
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    data = np.random.default_rng(0).integers(0, 255, size=byte_shape, dtype=np.uint8)
    writer.add_tensor(name, data, raw_dtype=qtype)


def add_gpt2_vocab(writer: Any, tok: Any, vocab_size: int) -> None:
    """llama.cpp `_set_vocab_gpt2` for a transformers byte-level BPE tokenizer."""
    import gguf

    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.get_added_vocab()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if reverse[i] in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = tok.backend_tokenizer.to_str()
    import json
    model = json.loads(merges)["model"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    if tok.bos_token_id is not None:
        writer.add_bos_token_id(tok.bos_token_id)
    if tok.eos_token_id is not None:
        writer.add_eos_token_id(tok.eos_token_id)
