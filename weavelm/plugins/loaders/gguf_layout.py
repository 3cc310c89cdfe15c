"""llama.cpp's GGUF layout for the dense decoders we read and write: tensor names, the Q/K row permutation, and the
metadata keys that carry the model config. Shared by the `gguf` loader and `weavelm convert --to gguf`.

Mirrors llama.cpp's `convert_hf_to_gguf.py`: `LlamaModel` (also used for Mistral) permutes the rows of q_proj and
k_proj (weights and biases) from Hugging Face's rotate-half order into GGML's interleaved rotary order;
`Qwen2Model` and `Qwen3Model` use NEOX rotary and store them unpermuted.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from weavelm.errors import LoadError

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
HF_GLOBAL = {v: k for k, v in GLOBAL_NAMES.items()}
HF_LAYER = {v: k for k, v in LAYER_NAMES.items()}
GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.([\w.]+)\.(weight|bias)$")

# GGUF architecture -> (transformers model_type, architectures entry). Mistral is written as "llama" by llama.cpp.
ARCHES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}
HF_TO_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
PERMUTED_ARCHES = frozenset({"llama"})


def gguf_to_hf_name(name: str) -> str | None:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    m = GGUF_LAYER_RE.match(name)
    if m and m.group(2) in LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def hf_to_gguf_name(name: str) -> str | None:
    if name in HF_GLOBAL:
        return HF_GLOBAL[name]
    m = HF_LAYER_RE.match(name)
    if m and m.group(2) in HF_LAYER:
        return f"blk.{m.group(1)}.{HF_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face rotate-half row order -> llama.cpp interleaved order (`LlamaModel.permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of `permute`: rows `(n_head, rows/n_head/2, 2, ...)` -> swap axes 1 and 2."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_heads(arch: str, hf_name: str, cfg: Any) -> int | None:
    """The head count to (un)permute `hf_name` with, or None when the tensor is stored as is."""
    if arch not in PERMUTED_ARCHES:
        return None
    if ".self_attn.q_proj." in hf_name:
        return cfg.num_attention_heads
    if ".self_attn.k_proj." in hf_name:
        return cfg.num_key_value_heads
    return None


def config_from_metadata(md: dict[str, Any], tensor_names: set[str], file: str) -> Any:
    """A transformers config from llama.cpp metadata keys (`{arch}.embedding_length`, ...)."""
    import transformers

    arch = md.get("general.architecture")
    if arch not in ARCHES:
        raise LoadError(f"{file}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHES)}")

    def key(k: str, default: Any = ...) -> Any:
        v = md.get(f"{arch}.{k}", default)
        if v is ...:
            raise LoadError(f"{file}: GGUF metadata lacks {arch}.{k}; the file is incomplete or not written by "
                            f"llama.cpp's converter")
        return v

    if "rope_freqs.weight" in tensor_names:
        raise LoadError(f"{file}: tensor 'rope_freqs.weight' (llama3-style rope scaling) is not supported yet")
    heads, hidden = int(key("attention.head_count")), int(key("embedding_length"))
    theta = float(key("rope.freq_base", 10000.0))
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    scaling = key("rope.scaling.type", "none")
    if scaling == "linear":
        rope = {"rope_type": "linear", "rope_theta": theta, "factor": float(key("rope.scaling.factor"))}
    elif scaling != "none":
        raise LoadError(f"{file}: rope scaling {scaling!r} in GGUF metadata is not supported (only linear)")
    tokens = md.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size", len(tokens) if tokens is not None else None)
    if vocab is None:
        raise LoadError(f"{file}: GGUF metadata gives no vocabulary size ({arch}.vocab_size or tokenizer tokens)")
    model_type, hf_arch = ARCHES[arch]
    kwargs: dict[str, Any] = dict(
        architectures=[hf_arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(key("attention.head_count_kv", heads)),
        head_dim=int(key("attention.key_length", hidden // heads)),
        max_position_embeddings=int(key("context_length", 4096)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_parameters=rope,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=md.get("tokenizer.ggml.padding_token_id"),
        dtype=FILE_TYPE_DTYPES.get(md.get("general.file_type"), "float32"),
    )
    if model_type == "llama":
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    cls = transformers.CONFIG_MAPPING[model_type]
    return cls(**kwargs)


# llama.cpp `general.file_type` (LlamaFileType) -> the dtype `dtype: auto` should pick; quantized files -> float32.
FILE_TYPE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}


def rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0) or 10000.0))


def write_metadata(writer: Any, cfg: Any, arch: str, name: str) -> None:
    """The llama.cpp metadata keys for `cfg` (`TextModel.set_gguf_parameters` and the per-model additions)."""
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(rope_theta(cfg))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if head_dim != cfg.hidden_size // heads or arch == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    params = getattr(cfg, "rope_parameters", None) or {}
    if params.get("rope_type", "default") == "linear":
        import gguf
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif params.get("rope_type", "default") != "default":
        raise LoadError(f"rope scaling {params['rope_type']!r} cannot be written to GGUF yet (only linear)")
