"""Llama-family decoder (Llama, Mistral, Qwen2) for flattened batches over a paged KV cache.

Q/K/V and gate/up projections are packed into one matmul each; `load_weights` maps checkpoint names onto the
packed parameters. Qwen3 reuses this with per-head Q/K RMSNorm (qwen3.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from weavelm.core.forward import ForwardBatch
from weavelm.core.interfaces import ModelArchitecture
from weavelm.plugins.models.layers import RMSNorm, RotaryEmbedding, SiluAndMul, copy_param


class DecoderDims:
    """The numbers every layer needs, read once from the transformers config."""

    def __init__(self, cfg: Any):
        self.hidden = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // self.num_heads
        self.intermediate = cfg.intermediate_size
        self.eps = getattr(cfg, "rms_norm_eps", 1e-6)
        self.num_layers = cfg.num_hidden_layers
        self.vocab = cfg.vocab_size
        self.max_positions = getattr(cfg, "max_position_embeddings", 4096)


class Attention(nn.Module):
    def __init__(self, d: DecoderDims, layer_idx: int, qkv_bias: bool, o_bias: bool, qk_norm: bool):
        super().__init__()
        self.d, self.layer_idx = d, layer_idx
        self.q_size, self.kv_size = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
        self.qkv_proj = nn.Linear(d.hidden, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, d.hidden, bias=o_bias)
        self.q_norm = RMSNorm(d.head_dim, d.eps) if qk_norm else None
        self.k_norm = RMSNorm(d.head_dim, d.eps) if qk_norm else None

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch,
                rotary: RotaryEmbedding) -> torch.Tensor:
        n, d = x.shape[0], self.d
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(n, d.num_heads, d.head_dim)
        k = k.reshape(n, d.num_kv_heads, d.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(positions, q, k)
        o = batch.attn_impls[self.layer_idx].forward(
            q.reshape(n, self.q_size), k.reshape(n, self.kv_size), v.contiguous(),
            batch.kv_caches[self.layer_idx], batch.attn_metadata)
        return self.o_proj(o)


class MLP(nn.Module):
    def __init__(self, d: DecoderDims, bias: bool):
        super().__init__()
        self.gate_up_proj = nn.Linear(d.hidden, 2 * d.intermediate, bias=bias)
        self.down_proj = nn.Linear(d.intermediate, d.hidden, bias=bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, d: DecoderDims, layer_idx: int, qkv_bias: bool, o_bias: bool, mlp_bias: bool,
                 qk_norm: bool):
        super().__init__()
        self.self_attn = Attention(d, layer_idx, qkv_bias, o_bias, qk_norm)
        self.mlp = MLP(d, mlp_bias)
        self.input_layernorm = RMSNorm(d.hidden, d.eps)
        self.post_attention_layernorm = RMSNorm(d.hidden, d.eps)

    def forward(self, positions, x, residual, batch, rotary):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, batch, rotary)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(ModelArchitecture):
    name = "llama"
    description = "Llama / Mistral / Qwen2 decoder (packed QKV and gate/up, paged attention)."
    hf_architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
    qk_norm = False

    def __init__(self, hf_config: Any):
        super().__init__()
        self.hf_config = hf_config
        d = self.dims = DecoderDims(hf_config)
        qkv_bias, o_bias = self._biases(hf_config)
        mlp_bias = bool(getattr(hf_config, "mlp_bias", False))
        self.embed_tokens = nn.Embedding(d.vocab, d.hidden)
        self.layers = nn.ModuleList(DecoderLayer(d, i, qkv_bias, o_bias, mlp_bias, self.qk_norm)
                                    for i in range(d.num_layers))
        self.norm = RMSNorm(d.hidden, d.eps)
        self.rotary = RotaryEmbedding(hf_config, d.head_dim, d.max_positions)
        self.tie_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = None if self.tie_embeddings else nn.Linear(d.hidden, d.vocab, bias=False)

    @staticmethod
    def _biases(cfg: Any) -> tuple[bool, bool]:
        if getattr(cfg, "model_type", "") == "qwen2":
            return True, False
        bias = bool(getattr(cfg, "attention_bias", False))
        return bias, bias

    def attention_layout(self) -> tuple[int, int, int, int]:
        d = self.dims
        return d.num_layers, d.num_heads, d.num_kv_heads, d.head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, batch, self.rotary)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return torch.nn.functional.linear(hidden_states, weight)

    # -- weights ------------------------------------------------------------------------------------------
    def _packed(self) -> dict[str, tuple[str, int, int]]:
        d = self.dims
        q, kv = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
        return {"q_proj": ("qkv_proj", 0, q), "k_proj": ("qkv_proj", q, kv), "v_proj": ("qkv_proj", q + kv, kv),
                "gate_proj": ("gate_up_proj", 0, d.intermediate),
                "up_proj": ("gate_up_proj", d.intermediate, d.intermediate)}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        packed = self._packed()
        loaded: set[str] = set()
        shards_seen: dict[str, set[int]] = {}
        for ckpt_name, tensor in weights:
            name = ckpt_name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding is the head
            shard = None
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in packed:
                target, offset, size = packed[parts[-2]]
                name = ".".join(parts[:-2] + [target, parts[-1]])
                shard = (offset, size)
            param = params.get(name)
            if param is None:
                raise KeyError(f"unexpected tensor {ckpt_name!r}: the {self.name} architecture has no such weight")
            with torch.no_grad():
                copy_param(param, tensor, ckpt_name, shard)
            if shard is None:
                loaded.add(name)
            else:
                shards_seen.setdefault(name, set()).add(shard[0])
        for name, seen in shards_seen.items():
            expected = {off for tgt, off, _ in packed.values() if name.endswith(f"{tgt}.{name.rsplit('.', 1)[1]}")}
            if seen >= expected:
                loaded.add(name)
        return loaded
