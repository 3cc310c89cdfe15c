"""CLIP's vision transformer (transformers' `CLIPVisionTransformer`) and SigLIP's (no CLS position, no pre-norm, a
biased patch embedding, an attention-pooling head kept only for the checkpoint), the vision towers of LLaVA. Module
names follow the checkpoint's (`embeddings.patch_embedding`, `encoder.layers.N.self_attn.q_proj`, ...), so weights load by name.
Replicated on every tensor-parallel rank (it is small next to the text model). `forward` returns the hidden state
after the embeddings' `pre_layrnorm` and after every encoder layer, so callers pick a layer as transformers'
`vision_feature_layer` does."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def activation(name: str) -> Any:
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def is_siglip(cfg: Any) -> bool:
    return str(getattr(cfg, "model_type", "")).startswith("siglip")


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: Any):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.with_cls = not is_siglip(cfg)
        if self.with_cls:
            self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size,
                                         bias=not self.with_cls)
        self.num_positions = (cfg.image_size // cfg.patch_size) ** 2 + self.with_cls
        self.position_embedding = nn.Embedding(self.num_positions, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)
        if self.with_cls:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        if x.shape[1] != self.num_positions:
            raise ValueError(f"pixel_values of {tuple(pixel_values.shape[-2:])} make {x.shape[1] - self.with_cls} "
                             f"patches; this tower takes {self.num_positions - self.with_cls}")
        return x + self.position_embedding.weight[None]


class CLIPAttention(nn.Module):
    def __init__(self, cfg: Any):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // self.num_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, -1))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: Any):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: Any):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: Any):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class SiglipPoolingHead(nn.Module):
    """SigLIP's attention-pooling head: loaded with the checkpoint, not run (LLaVA reads hidden states)."""

    def __init__(self, cfg: Any):
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, cfg.hidden_size))
        self.attention = nn.MultiheadAttention(cfg.hidden_size, cfg.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)


class CLIPVisionTower(nn.Module):
    """`forward(pixel_values (images, 3, H, W), num_layers)` -> the first `num_layers + 1` hidden states
    (images, positions, hidden; CLIP's position 0 is CLS): index 0 after the embeddings (and CLIP's `pre_layrnorm`),
    index i after encoder layer i - 1 (transformers' `hidden_states`). `post_layernorm` and SigLIP's head are kept
    for the checkpoint; LLaVA reads the hidden states."""

    def __init__(self, cfg: Any):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = None if is_siglip(cfg) else nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if is_siglip(cfg) and getattr(cfg, "vision_use_head", True):
            self.head = SiglipPoolingHead(cfg)

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layers)

    def forward(self, pixel_values: torch.Tensor, num_layers: int | None = None) -> list[torch.Tensor]:
        x = self.embeddings(pixel_values)
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)
        states = [x]
        for layer in self.encoder.layers[:self.num_layers if num_layers is None else num_layers]:
            x = layer(x)
            states.append(x)
        return states
