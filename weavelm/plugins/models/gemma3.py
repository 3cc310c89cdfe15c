"""Gemma 3 (text; transformers' `Gemma3ForCausalLM`, model_type `gemma3_text`), built only from `weavelm.layers`
and `weavelm.plugin`, as a third-party architecture would be.

What differs from the Llama decoder:
- local (sliding-window) and global layers interleaved by `config.layer_types` (`layer_windows`), each type with
  its own rope: transformers 5 keeps `rope_parameters = {"sliding_attention": {...}, "full_attention": {...}}`
  (older configs: `rope_local_base_freq` for the sliding layers, `rope_theta` plus `rope_scaling` for the global);
- per-head Q/K RMSNorm, and every norm is Gemma's `(1 + weight)` norm (`GemmaRMSNorm`);
- the embedding is multiplied by sqrt(hidden_size), rounded to the model dtype first as transformers does;
- four norms per layer: input, post-attention (before the residual add), pre- and post-feedforward;
- a gated GELU-tanh MLP (`gelu_pytorch_tanh`);
- attention scores scaled by `query_pre_attn_scalar ** -0.5` (the backends scale by head_dim ** -0.5, so q is
  multiplied by sqrt(head_dim / query_pre_attn_scalar) after the rope);
- a tied LM head by default, and Gemma 2's final logit soft-capping (`tanh(logits / cap) * cap`) when set.

Attention-logit soft-capping (`attn_logit_softcapping`) and bidirectional attention would need the attention
backends to change; a config that sets either is refused with a LoadError.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from weavelm.errors import LoadError
from weavelm.layers import (Attention, GeluAndMul, GemmaRMSNorm, MergedColumnParallelLinear, ParallelLMHead,
                            QKVParallelLinear, RotaryEmbedding, RowParallelLinear, TensorParallelGroup,
                            VocabParallelEmbedding, WeightsMapper, layer_windows, load_checkpoint, rope_parameters)
from weavelm.plugin import ForwardBatch, ModelArchitecture, hookimpl

# checkpoint projection -> (packed parameter, shard id)
STACKED = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
SLIDING, FULL = "sliding_attention", "full_attention"
GELU = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu": "none"}


def _check(cfg: Any) -> None:
    """LoadError for what this architecture cannot compute the way transformers does."""
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        raise LoadError(f"config.json: attn_logit_softcapping={cfg.attn_logit_softcapping} is not supported by "
                        f"weavelm's attention backends (Gemma 3 checkpoints leave it null); set it to null only if "
                        f"the model was trained without it")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise LoadError("config.json: use_bidirectional_attention=true (an embedding model) is not a causal decoder; "
                        "weavelm serves Gemma 3 with causal attention only")
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "gelu_pytorch_tanh")
    if act not in GELU:
        raise LoadError(f"config.json: hidden_activation={act!r} is not supported for Gemma 3; supported: "
                        f"{', '.join(GELU)}")


def rope_sections(cfg: Any) -> dict[str, dict[str, Any]]:
    """The rope section of each layer type: transformers 5's per-type `rope_parameters`, or the older flat fields
    (`rope_theta` and `rope_scaling` for global layers, `rope_local_base_freq` for sliding ones)."""
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and (SLIDING in params or FULL in params):
        full = params.get(FULL) or {"rope_type": "default", "rope_theta": 1_000_000.0}
        sliding = params.get(SLIDING) or {"rope_type": "default", "rope_theta": 10_000.0}
        return {FULL: dict(full), SLIDING: dict(sliding)}
    full = dict(getattr(cfg, "rope_scaling", None) or {"rope_type": "default"})
    full.setdefault("rope_theta", getattr(cfg, "rope_theta", None) or 1_000_000.0)
    local = getattr(cfg, "rope_local_base_freq", None) or 10_000.0
    return {FULL: full, SLIDING: {"rope_type": "default", "rope_theta": local}}


def _rotary(cfg: Any, section: dict[str, Any], head_dim: int, max_positions: int) -> RotaryEmbedding:
    view = SimpleNamespace(rope_parameters=section, max_position_embeddings=max_positions,
                           original_max_position_embeddings=getattr(cfg, "original_max_position_embeddings", None))
    return RotaryEmbedding.from_parameters(rope_parameters(view, head_dim), max_positions)


class Gemma3Dims:
    """The numbers every layer needs, read once from the transformers config (whole-model values)."""

    def __init__(self, cfg: Any):
        self.hidden = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // self.num_heads
        self.intermediate = cfg.intermediate_size
        self.eps = getattr(cfg, "rms_norm_eps", 1e-6)
        self.num_layers = cfg.num_hidden_layers
        self.vocab = cfg.vocab_size
        self.max_positions = getattr(cfg, "max_position_embeddings", 8192)
        self.bias = bool(getattr(cfg, "attention_bias", False))
        scalar = getattr(cfg, "query_pre_attn_scalar", None) or self.head_dim
        self.q_scale = math.sqrt(self.head_dim / scalar)  # backends scale by head_dim ** -0.5
        act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "gelu_pytorch_tanh")
        self.gelu = GELU[act]


class Gemma3Attention(nn.Module):
    """One layer's attention over this rank's heads: QKV, per-head Gemma norms, its layer type's rope, the
    `query_pre_attn_scalar` scale, paged attention (through its window, if it is a sliding layer), output."""

    def __init__(self, d: Gemma3Dims, layer_idx: int, tp: TensorParallelGroup, sliding_window: int | None):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(d.hidden, d.head_dim, d.num_heads, d.num_kv_heads, d.bias, tp)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim, self.q_scale = d.head_dim, d.q_scale
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(d.num_heads * d.head_dim, d.hidden, d.bias, tp)
        self.q_norm = GemmaRMSNorm(d.head_dim, d.eps)
        self.k_norm = GemmaRMSNorm(d.head_dim, d.eps)
        self.attn = Attention(self.num_heads, self.num_kv_heads, d.head_dim, layer_idx, sliding_window)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch,
                rotary: RotaryEmbedding) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(n, self.num_heads, self.head_dim))
        k = self.k_norm(k.reshape(n, self.num_kv_heads, self.head_dim))
        q, k = rotary(positions, q, k)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        o = self.attn(q.reshape(n, self.q_size), k.reshape(n, self.kv_size), v.contiguous(), batch)
        return self.o_proj(o)


class Gemma3MLP(nn.Module):
    def __init__(self, d: Gemma3Dims, tp: TensorParallelGroup):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(d.hidden, [d.intermediate, d.intermediate], False, tp)
        self.down_proj = RowParallelLinear(d.intermediate, d.hidden, False, tp)
        self.act = GeluAndMul(d.gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class Gemma3DecoderLayer(nn.Module):
    """x + post_attn(attn(input(x))), then h + post_ff(mlp(pre_ff(h))); the residual travels beside the hidden
    state so each add fuses into the next norm."""

    def __init__(self, d: Gemma3Dims, layer_idx: int, tp: TensorParallelGroup, sliding_window: int | None):
        super().__init__()
        self.is_sliding = sliding_window is not None
        self.self_attn = Gemma3Attention(d, layer_idx, tp, sliding_window)
        self.mlp = Gemma3MLP(d, tp)
        self.input_layernorm = GemmaRMSNorm(d.hidden, d.eps)
        self.post_attention_layernorm = GemmaRMSNorm(d.hidden, d.eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(d.hidden, d.eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(d.hidden, d.eps)

    def forward(self, positions, x, residual, batch, rotary):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(positions, x, batch, rotary))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class Gemma3ForCausalLM(ModelArchitecture):
    name = "gemma3"
    description = "Gemma 3 text decoder (local/global layers with per-type rope, Q/K norm, GELU MLP, tensor-parallel)."
    hf_architectures = ("Gemma3ForCausalLM",)
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    hf_to_weavelm_mapper = WeightsMapper({"model.": ""})

    def __init__(self, hf_config: Any, tp: TensorParallelGroup = TensorParallelGroup()):
        super().__init__()
        _check(hf_config)
        self.hf_config, self.tp = hf_config, tp
        d = self.dims = Gemma3Dims(hf_config)
        self.embed_tokens = VocabParallelEmbedding(d.vocab, d.hidden, tp)
        self.embed_scale = d.hidden ** 0.5
        windows = layer_windows(hf_config, d.num_layers)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(d, i, tp, windows[i]) for i in range(d.num_layers))
        self.norm = GemmaRMSNorm(d.hidden, d.eps)
        sections = rope_sections(hf_config)
        self.rotary_global = _rotary(hf_config, sections[FULL], d.head_dim, d.max_positions)
        self.rotary_local = _rotary(hf_config, sections[SLIDING], d.head_dim, d.max_positions)
        self.tie_embeddings = bool(getattr(hf_config, "tie_word_embeddings", True))
        self.lm_head = None if self.tie_embeddings else ParallelLMHead(d.vocab, d.hidden, tp)
        self.final_softcap = getattr(hf_config, "final_logit_softcapping", None)

    def attention_layout(self) -> tuple[int, int, int, int]:
        """Per rank: (num_layers, this rank's query heads, this rank's KV heads, head_size)."""
        attn = self.layers[0].self_attn
        return self.dims.num_layers, attn.num_heads, attn.num_kv_heads, attn.head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype, device=x.device)  # rounded like transformers
        residual = None
        for layer in self.layers:
            rotary = self.rotary_local if layer.is_sliding else self.rotary_global
            x, residual = layer(positions, x, residual, batch, rotary)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits on every rank, soft-capped when the config sets `final_logit_softcapping`."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        logits = head.compute_logits(hidden_states)
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """Hand each checkpoint tensor to its parameter's `weight_loader` (this rank's shard); Q/K/V and gate/up
        go into their packed layers. A tied head ignores `lm_head.weight`."""
        return load_checkpoint(self, weights, mapper=self.hf_to_weavelm_mapper, stacked=STACKED,
                               skip={"lm_head.weight"} if self.lm_head is None else ())


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("model", Gemma3ForCausalLM.name, Gemma3ForCausalLM)
