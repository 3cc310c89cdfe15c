"""Llama-family decoder (Llama, Mistral, Qwen2) for flattened batches over a paged KV cache, tensor-parallel;
each layer's sliding window (or None) comes from the config (windows.py).

Built only from `weavelm.layers` and `weavelm.plugin`, as a third-party architecture would be. Q/K/V and gate/up
projections are packed into one matmul each (`packed_modules_mapping` names their checkpoint parts, for loading and
for LoRA); `load_weights` hands each checkpoint tensor to its parameter's `weight_loader`, which copies in this rank's
shard. Qwen3 reuses this with per-head Q/K RMSNorm (qwen3.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from weavelm.layers import (layer_windows, Attention, MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RMSNorm,
                            RotaryEmbedding, RowParallelLinear, SiluAndMul, TensorParallelGroup,
                            VocabParallelEmbedding, WeightsMapper, load_checkpoint)
from weavelm.plugin import ForwardBatch, ModelArchitecture
from weavelm.plugins.models.native_stack import NativeStack

# checkpoint projection -> (packed parameter, shard id)
STACKED = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class DecoderDims:
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
        self.max_positions = getattr(cfg, "max_position_embeddings", 4096)


class LlamaAttention(nn.Module):
    """One layer's attention over this rank's heads (`qkv_proj.num_heads` / `qkv_proj.num_kv_heads`)."""

    def __init__(self, d: DecoderDims, layer_idx: int, qkv_bias: bool, o_bias: bool, qk_norm: bool,
                 tp: TensorParallelGroup, sliding_window: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.qkv_proj = QKVParallelLinear(d.hidden, d.head_dim, d.num_heads, d.num_kv_heads, qkv_bias, tp)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = d.head_dim
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(d.num_heads * d.head_dim, d.hidden, o_bias, tp)
        self.q_norm = RMSNorm(d.head_dim, d.eps) if qk_norm else None
        self.k_norm = RMSNorm(d.head_dim, d.eps) if qk_norm else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, d.head_dim, layer_idx, sliding_window)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch,
                rotary: RotaryEmbedding) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x)
        if self.attn.accepts_strided(batch) and rotary.inplace_ok(positions, qkv):
            if self.q_norm is not None:  # Qwen3's per-head norms, in place on the packed rows
                self.q_norm.norm_heads_inplace(qkv, 0, self.num_heads, self.head_dim)
                self.k_norm.norm_heads_inplace(qkv, self.q_size, self.num_kv_heads, self.head_dim)
            rotary.rotate_inplace(positions, qkv, self.num_heads, self.num_kv_heads)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            return self.o_proj(self.attn(q, k, v, batch))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(n, self.num_heads, self.head_dim)
        k = k.reshape(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(positions, q, k)
        o = self.attn(q.reshape(n, self.q_size), k.reshape(n, self.kv_size), v.contiguous(), batch)
        return self.o_proj(o)


class MLP(nn.Module):
    def __init__(self, d: DecoderDims, bias: bool, tp: TensorParallelGroup):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(d.hidden, [d.intermediate, d.intermediate], bias, tp)
        self.down_proj = RowParallelLinear(d.intermediate, d.hidden, bias, tp)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, d: DecoderDims, layer_idx: int, qkv_bias: bool, o_bias: bool, mlp_bias: bool,
                 qk_norm: bool, tp: TensorParallelGroup, sliding_window: int | None = None):
        super().__init__()
        self.self_attn = LlamaAttention(d, layer_idx, qkv_bias, o_bias, qk_norm, tp, sliding_window)
        self.mlp = MLP(d, mlp_bias, tp)
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
    description = "Llama / Mistral / Qwen2 decoder (packed QKV and gate/up, paged attention, tensor-parallel)."
    hf_architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
    qk_norm = False
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    hf_to_weavelm_mapper = WeightsMapper({"model.": ""})

    def __init__(self, hf_config: Any, tp: TensorParallelGroup = TensorParallelGroup()):
        super().__init__()
        self.hf_config, self.tp = hf_config, tp
        d = self.dims = DecoderDims(hf_config)
        qkv_bias, o_bias = self._biases(hf_config)
        mlp_bias = bool(getattr(hf_config, "mlp_bias", False))
        self.embed_tokens = VocabParallelEmbedding(d.vocab, d.hidden, tp)
        windows = layer_windows(hf_config, d.num_layers)
        self.layers = nn.ModuleList(DecoderLayer(d, i, qkv_bias, o_bias, mlp_bias, self.qk_norm, tp, windows[i])
                                    for i in range(d.num_layers))
        self.norm = RMSNorm(d.hidden, d.eps)
        self.rotary = RotaryEmbedding(hf_config, d.head_dim, d.max_positions)
        self.tie_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = None if self.tie_embeddings else ParallelLMHead(d.vocab, d.hidden, tp)

    @staticmethod
    def _biases(cfg: Any) -> tuple[bool, bool]:
        if getattr(cfg, "model_type", "") == "qwen2":
            return True, False
        bias = bool(getattr(cfg, "attention_bias", False))
        return bias, bias

    def attention_layout(self) -> tuple[int, int, int, int]:
        """Per rank: (num_layers, this rank's query heads, this rank's KV heads, head_size)."""
        attn = self.layers[0].self_attn
        return self.dims.num_layers, attn.num_heads, attn.num_kv_heads, attn.head_dim

    def get_input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """`inputs_embeds` (num_tokens, hidden), when given, replaces the embedding of `input_ids` (a
        vision-language model's text with image embeddings scattered in)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        if x.is_cpu:  # small fp32 CPU steps: the whole stack in one native call (native_stack.py)
            stack = self.__dict__.get("_native_stack")
            if stack is None:
                stack = self.__dict__["_native_stack"] = NativeStack.build(self) or False
            done = stack.run(positions, x, batch) if stack else None
            if done is not None:
                x, _ = self.norm(*done)
                return x
        for layer in self.layers:
            x, residual = layer(positions, x, residual, batch, self.rotary)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits on every rank (the shards are all-gathered)."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return head.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """Hand each checkpoint tensor (whole-model shape; a tensor or LazyTensor) to its parameter's
        `weight_loader`, which copies this rank's shard. Returns the parameters filled (packed ones once every
        part arrived)."""
        return load_checkpoint(self, weights, mapper=self.hf_to_weavelm_mapper, stacked=STACKED,
                               skip={"lm_head.weight"} if self.lm_head is None else ())
