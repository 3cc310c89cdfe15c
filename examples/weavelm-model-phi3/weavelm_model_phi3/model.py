"""Phi-3 (`Phi3ForCausalLM`) for weavelm, written only against `weavelm.plugin` and `weavelm.layers`.

The checkpoint already stores Q/K/V as one `qkv_proj` and gate/up as one `gate_up_proj`; the library's
`QKVParallelLinear` and `MergedColumnParallelLinear` load such a fused tensor (`shard_id=None`) by splitting it into
their parts, so each tensor-parallel rank takes its heads and its share of the MLP. Rope: the default, and Phi-3's
`longrope` (alias `su`) with `short_factor` / `long_factor`, and `partial_rotary_factor`; any other rope type is a
ConfigError from `weavelm.layers.rope_parameters`. The module tree mirrors transformers' (`model.layers.N...`,
`lm_head`), so checkpoint and PEFT adapter names need no mapping.

Nothing here knows about LoRA, tensor parallelism, speculative decoding or CUDA graphs: they attach to the layers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from weavelm.layers import (Attention, MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RMSNorm,
                            RotaryEmbedding, RowParallelLinear, SiluAndMul, TensorParallelGroup,
                            VocabParallelEmbedding, WeightsMapper, load_checkpoint)
from weavelm.plugin import API_VERSION, ConfigError, ForwardBatch, ModelArchitecture, hookimpl

WEAVELM_API_VERSION = API_VERSION
logger = logging.getLogger(__name__)


class Phi3Attention(nn.Module):
    def __init__(self, cfg: Any, layer_idx: int, tp: TensorParallelGroup):
        super().__init__()
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, self.head_dim, heads, kv_heads, False, tp)
        self.o_proj = RowParallelLinear(heads * self.head_dim, cfg.hidden_size, False, tp)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, layer_idx)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch,
                rotary: RotaryEmbedding) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = rotary(positions, q.reshape(n, self.num_heads, self.head_dim),
                      k.reshape(n, self.num_kv_heads, self.head_dim))
        return self.o_proj(self.attn(q.reshape(n, self.q_size), k.reshape(n, self.kv_size), v.contiguous(), batch))


class Phi3MLP(nn.Module):
    def __init__(self, cfg: Any, tp: TensorParallelGroup):
        super().__init__()
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ConfigError([("hidden_act", f"Phi-3 with hidden_act={cfg.hidden_act!r} is not supported; only "
                                              f"'silu' (every released Phi-3)")])
        inter = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [inter, inter], False, tp)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, False, tp)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class Phi3DecoderLayer(nn.Module):
    def __init__(self, cfg: Any, layer_idx: int, tp: TensorParallelGroup):
        super().__init__()
        self.self_attn = Phi3Attention(cfg, layer_idx, tp)
        self.mlp = Phi3MLP(cfg, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, residual, batch, rotary):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, batch, rotary)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Phi3Model(nn.Module):
    def __init__(self, cfg: Any, tp: TensorParallelGroup):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(Phi3DecoderLayer(cfg, i, tp) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.rotary = RotaryEmbedding(cfg, head_dim, cfg.max_position_embeddings)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, batch, self.rotary)
        x, _ = self.norm(x, residual)
        return x


class Phi3ForCausalLM(ModelArchitecture):
    name = "phi3"
    description = "Phi-3 decoder (fused qkv_proj and gate_up_proj checkpoints, longrope; out-of-tree example)."
    hf_architectures = ("Phi3ForCausalLM",)
    packed_modules_mapping: dict[str, list[str]] = {}  # the checkpoint's modules are already fused
    hf_to_weavelm_mapper = WeightsMapper()  # module names are the checkpoint's

    def __init__(self, hf_config: Any, tp: TensorParallelGroup = TensorParallelGroup()):
        super().__init__()
        window = getattr(hf_config, "sliding_window", None)
        if window is not None and window < hf_config.max_position_embeddings:
            logger.warning("Phi-3 config has sliding_window=%d: weavelm attends to the whole context, so sequences "
                           "longer than %d tokens differ from transformers' windowed attention", window, window)
        self.model = Phi3Model(hf_config, tp)
        self.tie_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = None if self.tie_embeddings else ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size,
                                                                      tp)

    def attention_layout(self) -> tuple[int, int, int, int]:
        attn = self.model.layers[0].self_attn
        return len(self.model.layers), attn.num_heads, attn.num_kv_heads, attn.head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.model(input_ids, positions, batch)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        return head.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        return load_checkpoint(self, weights, mapper=self.hf_to_weavelm_mapper, stacked={},
                               skip={"lm_head.weight"} if self.lm_head is None else ())


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("model", Phi3ForCausalLM.name, Phi3ForCausalLM)
