"""Qwen2-VL's vision transformer: patches (with a temporal patch) -> ViT blocks with 2D rotary -> patch merger.

The image processor cuts each image (or video) into a `(t, h, w)` grid of patches of `in_channels x
temporal_patch_size x patch_size x patch_size` values, flattened in the order of `pixel_values` rows, with each
`spatial_merge_size x spatial_merge_size` window of patches contiguous. The tower embeds every patch (the
checkpoint's Conv3d with stride = kernel, applied as one matmul), runs `depth` pre-norm blocks whose attention is
bidirectional within each frame of one image and rotates queries and keys by the patch's (row, column) - half the
rotary frequencies by the row, half by the column - and merges each window of patches into one embedding of the
text model's width (`merger`: LayerNorm, then a two-layer GELU MLP over the concatenated window).

Built from `weavelm.layers` linears, so the tower shards across tensor-parallel ranks by heads and MLP columns
like the decoder does. Parameter names are the checkpoint's (`patch_embed.proj`, `blocks.N.attn.qkv`, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weavelm.errors import ConfigError
from weavelm.layers import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear, TensorParallelGroup
from weavelm.layers.linear import default_weight_loader

Grid = Sequence[int]  # (t, h, w) patches of one image or video


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": _quick_gelu, "gelu": F.gelu, "silu": F.silu,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def activation(name: str):
    """The vision MLP's activation by its transformers name; ConfigError for one this tower does not know."""
    if name not in ACTIVATIONS:
        raise ConfigError([("vision_config.hidden_act", f"unsupported activation {name!r}; supported: "
                            f"{', '.join(ACTIVATIONS)}")])
    return ACTIVATIONS[name]


@dataclass(frozen=True)
class VisionDims:
    """The vision config's numbers (whole-model values); Qwen2-VL and Qwen2.5-VL name some differently."""

    embed_dim: int
    num_heads: int
    depth: int
    mlp_hidden: int
    hidden_act: str
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    out_hidden: int
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @classmethod
    def from_config(cls, cfg: Any, embed_dim: int, mlp_hidden: int, out_hidden: int) -> VisionDims:
        rope = getattr(cfg, "rope_parameters", None) or {}
        d = cls(embed_dim, cfg.num_heads, cfg.depth, mlp_hidden, cfg.hidden_act, cfg.in_channels, cfg.patch_size,
                cfg.temporal_patch_size, cfg.spatial_merge_size, out_hidden, float(rope.get("rope_theta", 10000.0)))
        if d.head_dim % 4:
            raise ConfigError([("vision_config.num_heads", f"the head size ({d.head_dim}) must be a multiple of "
                                f"4 for the 2D rotary embedding")])
        return d

    @classmethod
    def qwen2_vl(cls, cfg: Any) -> VisionDims:
        return cls.from_config(cfg, cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), cfg.hidden_size)


class PatchEmbed(nn.Module):
    """(patches, C * T * P * P) -> (patches, embed_dim): the checkpoint's Conv3d (kernel = stride = one patch) as a
    matmul. Replicated on every rank (it is small)."""

    def __init__(self, d: VisionDims):
        super().__init__()
        self.proj = nn.Module()
        shape = (d.embed_dim, d.in_channels, d.temporal_patch_size, d.patch_size, d.patch_size)
        self.proj.weight = nn.Parameter(torch.empty(shape), requires_grad=False)
        self.proj.weight.weight_loader = default_weight_loader

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(pixel_values.to(w.dtype).reshape(-1, w[0].numel()), w.reshape(w.shape[0], -1))


def patch_positions(grids: Sequence[Grid], merge_size: int) -> torch.Tensor:
    """(patches, 2) int64: each patch's (row, column) in its image, in the processor's row order (each
    `merge_size x merge_size` window contiguous; a video's frames repeat the same grid)."""
    out = []
    for t, h, w in grids:
        rows = torch.arange(h).view(h // merge_size, merge_size, 1, 1).expand(-1, -1, w // merge_size, merge_size)
        cols = torch.arange(w).view(1, 1, w // merge_size, merge_size).expand(h // merge_size, merge_size, -1, -1)
        hw = torch.stack([rows.transpose(1, 2).reshape(-1), cols.transpose(1, 2).reshape(-1)], dim=-1)
        out.append(hw.repeat(t, 1))
    return torch.cat(out)


class VisionRotary(nn.Module):
    """2D rotary of the vision blocks: the first half of the rotated frequencies follow the patch row, the second
    half the column, with `head_dim // 4` frequencies `theta ** (-4i / head_dim)` each."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        spatial = head_dim // 2
        inv = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float32) / spatial))
        self.register_buffer("inv_freq", inv.to(torch.empty(0).device), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (patches, 2) -> cos, sin (patches, 1, head_dim // 2) fp32 (halves for a neox rotation)."""
        freqs = positions.to(self.inv_freq.device, torch.float32)[..., None] * self.inv_freq  # (N, 2, hd // 4)
        freqs = freqs.flatten(1)
        return freqs.cos().unsqueeze(1), freqs.sin().unsqueeze(1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def frame_bounds(grids: Sequence[Grid], num_patches: int) -> list[int]:
    """Cumulative patch counts at each frame's end (frames attend within themselves); ValueError when the
    grids need another number of patch rows than `num_patches`."""
    bounds = [0]
    for t, h, w in grids:
        for _ in range(t):
            bounds.append(bounds[-1] + h * w)
    if num_patches != bounds[-1]:
        raise ValueError(f"pixel_values has {num_patches} patches, the grids {list(grids)} need {bounds[-1]}")
    return bounds


def segments_by_length(cu_seqlens: Sequence[int]) -> list[torch.Tensor]:
    """The segments [cu[i], cu[i+1]) grouped by length: one (segments, length) int64 row index per length, so
    equal-sized frames or windows run as one batched attention call."""
    groups: dict[int, list[int]] = {}
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        groups.setdefault(end - start, []).append(start)
    return [torch.tensor(starts)[:, None] + torch.arange(n) for n, starts in groups.items()]


class VisionAttention(nn.Module):
    """Bidirectional attention within each segment (a frame, or a window) of `cu_seqlens`, over this rank's
    heads; segments of one length are batched into one attention call."""

    def __init__(self, d: VisionDims, tp: TensorParallelGroup):
        super().__init__()
        self.qkv = QKVParallelLinear(d.embed_dim, d.head_dim, d.num_heads, d.num_heads, True, tp)
        self.num_heads, self.head_dim = self.qkv.num_heads, d.head_dim
        self.proj = RowParallelLinear(d.embed_dim, d.embed_dim, True, tp)

    def forward(self, x: torch.Tensor, segments: list[torch.Tensor], cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        """x (patches, embed); `segments`: `segments_by_length` of the attention bounds."""
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = torch.empty_like(q)
        for rows in segments:
            rows = rows.to(x.device)
            qs, ks, vs = (t[rows].transpose(1, 2) for t in (q, k, v))  # (segments, heads, length, head_dim)
            out[rows] = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)
        return self.proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, d: VisionDims, tp: TensorParallelGroup):
        super().__init__()
        self.fc1 = ColumnParallelLinear(d.embed_dim, d.mlp_hidden, True, tp)
        self.fc2 = RowParallelLinear(d.mlp_hidden, d.embed_dim, True, tp)
        self.act = activation(d.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, d: VisionDims, tp: TensorParallelGroup):
        super().__init__()
        self.norm1 = nn.LayerNorm(d.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(d.embed_dim, eps=1e-6)
        self.attn = VisionAttention(d, tp)
        self.mlp = VisionMLP(d, tp)

    def forward(self, x: torch.Tensor, segments: list[torch.Tensor], cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), segments, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Each window of `merge_size ** 2` patches -> one embedding of the text model's width. `norm`: the patch norm
    (Qwen2-VL a LayerNorm, Qwen2.5-VL an RMSNorm)."""

    def __init__(self, d: VisionDims, tp: TensorParallelGroup, norm: nn.Module | None = None):
        super().__init__()
        self.window = d.embed_dim * d.merge_size ** 2
        self.ln_q = nn.LayerNorm(d.embed_dim, eps=1e-6) if norm is None else norm
        self.mlp = nn.Sequential(ColumnParallelLinear(self.window, self.window, True, tp), nn.GELU(),
                                 RowParallelLinear(self.window, d.out_hidden, True, tp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.window))


class Qwen2VisionTransformer(nn.Module):
    """The vision tower: `forward(pixel_values, grids)` -> (merged tokens, text hidden), one row per placeholder
    token, images in order (image i owns `t * h * w // merge_size ** 2` rows)."""

    def __init__(self, vision_config: Any, tp: TensorParallelGroup = TensorParallelGroup()):
        super().__init__()
        d = self.dims = VisionDims.qwen2_vl(vision_config)
        self.patch_embed = PatchEmbed(d)
        self.rotary = VisionRotary(d.head_dim, d.rope_theta)
        self.blocks = nn.ModuleList(VisionBlock(d, tp) for _ in range(d.depth))
        self.merger = PatchMerger(d, tp)

    def num_tokens(self, grid: Grid) -> int:
        """Placeholder tokens (merged embeddings) of one image or video of `grid` patches."""
        t, h, w = grid
        return t * h * w // self.dims.merge_size ** 2

    def forward(self, pixel_values: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        grids = [tuple(int(v) for v in g) for g in grids]
        frames = segments_by_length(frame_bounds(grids, pixel_values.shape[0]))
        x = self.patch_embed(pixel_values)
        cos, sin = self.rotary(patch_positions(grids, self.dims.merge_size))
        for block in self.blocks:
            x = block(x, frames, cos, sin)
        return self.merger(x)
