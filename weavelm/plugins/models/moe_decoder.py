"""The decoder shared by the mixture-of-experts architectures (Mixtral, Qwen2-MoE, Qwen3-MoE): the Llama decoder of
`decoder.py` (attention, norms, rotary, embeddings, head) whose feed-forward is a `weavelm.layers.FusedMoE` (or, on
the layers a checkpoint keeps dense, the dense MLP). A subclass says how one layer's feed-forward is built and under
which checkpoint name (`moe_attr`: Mixtral's `block_sparse_moe`, Qwen's `mlp`).

With expert parallelism (`parallel.layout.expert`, vLLM's `enable_expert_parallel`) every `FusedMoE` holds only its
rank's experts (`weavelm.layers.expert_parallel`); attention and dense layers stay tensor-parallel.

Expert weights load through `load_moe_checkpoint` (per-expert checkpoint tensors into the stacked `w13` / `w2`); the
experts take no LoRA, the attention, dense MLPs and shared experts do (the LoRA manager wraps them by type).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from weavelm.layers import (ExpertParallel, FusedMoE, ParallelContext, ParallelLMHead, RMSNorm, RotaryEmbedding,
                            TensorParallelGroup, VocabParallelEmbedding, load_moe_checkpoint)
from weavelm.plugin import ModelArchitecture
from weavelm.plugins.models.decoder import MLP, STACKED, DecoderDims, LlamaAttention, LlamaForCausalLM


class MoeDecoderLayer(nn.Module):
    """Attention then the feed-forward `ffn`, registered under the checkpoint's name `ffn_attr`."""

    def __init__(self, d: DecoderDims, layer_idx: int, qkv_bias: bool, o_bias: bool, qk_norm: bool,
                 tp: TensorParallelGroup, ffn: nn.Module, ffn_attr: str):
        super().__init__()
        self.self_attn = LlamaAttention(d, layer_idx, qkv_bias, o_bias, qk_norm, tp)
        self.ffn_attr = ffn_attr
        setattr(self, ffn_attr, ffn)
        self.input_layernorm = RMSNorm(d.hidden, d.eps)
        self.post_attention_layernorm = RMSNorm(d.hidden, d.eps)

    def forward(self, positions, x, residual, batch, rotary):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, batch, rotary)
        x, residual = self.post_attention_layernorm(x, residual)
        return getattr(self, self.ffn_attr)(x), residual


class MoeForCausalLM(LlamaForCausalLM):
    """Base of the MoE architectures; subclasses implement `feed_forward` (passing `self.expert_parallel` to their
    `FusedMoE`) and set `moe_attr`. `parallel`: the rank's groups; its expert group spreads the experts when the
    layout asks for expert parallelism."""

    moe_attr = "mlp"
    supports_expert_parallel = True
    supports_pp = False  # builds every layer itself (no `pp` keyword); pipeline parallelism is refused

    def __init__(self, hf_config: Any, tp: TensorParallelGroup = TensorParallelGroup(),
                 parallel: ParallelContext | None = None):
        ModelArchitecture.__init__(self)
        self.hf_config, self.tp = hf_config, tp
        self.expert_parallel = ExpertParallel.from_context(parallel)
        d = self.dims = DecoderDims(hf_config)
        qkv_bias, o_bias = self._biases(hf_config)
        self.embed_tokens = VocabParallelEmbedding(d.vocab, d.hidden, tp)
        self.layers = nn.ModuleList(
            MoeDecoderLayer(d, i, qkv_bias, o_bias, self.qk_norm, tp, self.feed_forward(hf_config, d, i, tp),
                            self.moe_attr)
            for i in range(d.num_layers))
        self.norm = RMSNorm(d.hidden, d.eps)
        self.rotary = RotaryEmbedding(hf_config, d.head_dim, d.max_positions)
        self.tie_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = None if self.tie_embeddings else ParallelLMHead(d.vocab, d.hidden, tp)

    def feed_forward(self, cfg: Any, d: DecoderDims, layer_idx: int, tp: TensorParallelGroup) -> nn.Module:
        """Layer `layer_idx`'s feed-forward: a `FusedMoE`, or a dense `MLP` where the checkpoint has one."""
        raise NotImplementedError

    @staticmethod
    def _biases(cfg: Any) -> tuple[bool, bool]:
        bias = bool(getattr(cfg, "attention_bias", False))
        return bias, bias

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """Like the Llama decoder's, with each expert's tensors going into its layer's stacked expert weights."""
        return load_moe_checkpoint(self, weights, mapper=self.hf_to_weavelm_mapper, stacked=STACKED,
                                   skip={"lm_head.weight"} if self.lm_head is None else ())


def qwen_moe_layer(cfg: Any, d: DecoderDims, layer_idx: int, tp: TensorParallelGroup,
                   shared_intermediate: int, ep: ExpertParallel | None = None) -> nn.Module:
    """Qwen2-MoE / Qwen3-MoE's rule: dense where `mlp_only_layers` lists the layer or it is not every
    `decoder_sparse_step`-th layer, else sparse."""
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    if layer_idx in (getattr(cfg, "mlp_only_layers", None) or []) or cfg.num_experts <= 0 or \
            (layer_idx + 1) % step:
        return MLP(d, False, tp)
    return FusedMoE(d.hidden, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                    bool(getattr(cfg, "norm_topk_prob", False)), tp, shared_intermediate=shared_intermediate, ep=ep)
