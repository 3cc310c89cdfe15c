"""Llama-family decoder (Llama, Mistral, Qwen2) for flattened batches over a paged KV cache, tensor-parallel;
each layer's sliding window (or None) comes from the config (windows.py).

Q/K/V and gate/up projections are packed into one matmul each; `load_weights` hands each checkpoint tensor to its
parameter's `weight_loader`, which copies in this rank's shard (parallel_layers.py). Qwen3 reuses this with per-head
Q/K RMSNorm (qwen3.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from weavelm.core.forward import ForwardBatch
from weavelm.core.interfaces import ModelArchitecture
from weavelm.distributed import TensorParallelGroup
from weavelm.ops import native
from weavelm.plugins.models.layers import RMSNorm, RotaryEmbedding, SiluAndMul
from weavelm.plugins.models.native_stack import NativeStack
from weavelm.plugins.models.windows import layer_windows
from weavelm.plugins.models.parallel_layers import (MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear,
                                                    RowParallelLinear, VocabParallelEmbedding, default_weight_loader)

# checkpoint projection -> (packed parameter, shard id)
STACKED = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
PACKED_SHARDS = {"qkv_proj": {"q", "k", "v"}, "gate_up_proj": {0, 1}}


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


class Attention(nn.Module):
    """One layer's attention over this rank's heads (`qkv_proj.num_heads` / `qkv_proj.num_kv_heads`)."""

    def __init__(self, d: DecoderDims, layer_idx: int, qkv_bias: bool, o_bias: bool, qk_norm: bool,
                 tp: TensorParallelGroup, sliding_window: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window  # the runner builds this layer's attention impl with it
        self.qkv_proj = QKVParallelLinear(d.hidden, d.head_dim, d.num_heads, d.num_kv_heads, qkv_bias, tp)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = d.head_dim
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(d.num_heads * d.head_dim, d.hidden, o_bias, tp)
        self.q_norm = RMSNorm(d.head_dim, d.eps) if qk_norm else None
        self.k_norm = RMSNorm(d.head_dim, d.eps) if qk_norm else None

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch,
                rotary: RotaryEmbedding) -> torch.Tensor:
        n = x.shape[0]
        impl = batch.attn_impls[self.layer_idx]
        qkv = self.qkv_proj(x)
        if getattr(impl, "accepts_strided_qkv", False) and rotary.inplace_ok(positions, qkv):
            self._norm_heads_inplace(qkv)
            rotary.rotate_inplace(positions, qkv, self.num_heads, self.num_kv_heads)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            return self.o_proj(impl.forward(q, k, v, batch.kv_caches[self.layer_idx], batch.attn_metadata))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(n, self.num_heads, self.head_dim)
        k = k.reshape(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(positions, q, k)
        o = batch.attn_impls[self.layer_idx].forward(
            q.reshape(n, self.q_size), k.reshape(n, self.kv_size), v.contiguous(),
            batch.kv_caches[self.layer_idx], batch.attn_metadata)
        return self.o_proj(o)

    def _norm_heads_inplace(self, qkv: torch.Tensor) -> None:
        """Qwen3's per-head q/k RMSNorm in place on the qkv rows (native kernel; the caller checked qkv)."""
        if self.q_norm is not None:
            native.head_norm_(qkv, 0, self.num_heads, self.head_dim, self.q_norm.weight, self.q_norm.eps)
            native.head_norm_(qkv, self.q_size, self.num_kv_heads, self.head_dim, self.k_norm.weight,
                              self.k_norm.eps)


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
        self.self_attn = Attention(d, layer_idx, qkv_bias, o_bias, qk_norm, tp, sliding_window)
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

    def attention_windows(self) -> list[int | None]:
        return [layer.self_attn.sliding_window for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
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

    # -- weights ------------------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """Hand each checkpoint tensor (whole-model shape; a tensor or LazyTensor) to its parameter's
        `weight_loader`, which copies this rank's shard. Returns the parameters filled (packed ones once every
        part arrived)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        shards_seen: dict[str, set] = {}
        for ckpt_name, tensor in weights:
            name = ckpt_name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding is the head
            shard_id, parts = None, name.split(".")
            if len(parts) >= 2 and parts[-2] in STACKED:
                packed, shard_id = STACKED[parts[-2]]
                name = ".".join(parts[:-2] + [packed, parts[-1]])
            param = params.get(name)
            if param is None:
                raise KeyError(f"unexpected tensor {ckpt_name!r}: the {self.name} architecture has no such weight")
            loader = getattr(param, "weight_loader", default_weight_loader)
            try:
                loader(param, tensor, shard_id)
            except ValueError as e:
                raise ValueError(f"tensor {ckpt_name!r} {e}") from e
            if shard_id is None:
                loaded.add(name)
            else:
                shards_seen.setdefault(name, set()).add(shard_id)
        for name, seen in shards_seen.items():
            if seen >= PACKED_SHARDS[name.split(".")[-2]]:
                loaded.add(name)
        return loaded
