"""CLIP's vision transformer (transformers' `CLIPVisionTransformer`), the vision tower of LLaVA. Module names follow
the checkpoint's (`embeddings.patch_embedding`, `encoder.layers.N.self_attn.q_proj`, ...), so weights load by name.
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


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: Any):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(self.num_positions, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1)
        if x.shape[1] != self.num_positions:
            raise ValueError(f"pixel_values of {tuple(pixel_values.shape[-2:])} make {x.shape[1] - 1} patches; this "
                             f"tower takes {self.num_positions - 1}")
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


class CLIPVisionTower(nn.Module):
    """`forward(pixel_values (images, 3, H, W), num_layers)` -> the first `num_layers + 1` hidden states
    (images, patches + 1, hidden): index 0 after `pre_layrnorm`, index i after encoder layer i - 1 (transformers'
    `hidden_states`). `post_layernorm` is kept for the checkpoint; LLaVA reads pre-norm hidden states."""

    def __init__(self, cfg: Any):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layers)

    def forward(self, pixel_values: torch.Tensor, num_layers: int | None = None) -> list[torch.Tensor]:
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = [x]
        for layer in self.encoder.layers[:self.num_layers if num_layers is None else num_layers]:
            x = layer(x)
            states.append(x)
        return states
