"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): Qwen2-VL's decoder and positions with a windowed vision tower.

The tower differs from Qwen2-VL's (`qwen2_vl_vision.py`) in three ways: RMSNorm instead of LayerNorm, a gated
(SwiGLU) MLP with biases, and windowed attention: the merged patches are regrouped into windows of
`window_size // merge // patch` merged patches a side (tokens reordered window by window, the rotary angles with
them), every block attends within its window except those in `fullatt_block_indexes`, which attend over the whole
frame, and the merger's output is put back into the processor's order. A video's frames are
`tokens_per_second * second_per_grid_t` positions apart on the temporal row (`VisionPlacement.time_interval`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weavelm.layers import MergedColumnParallelLinear, RMSNorm, RowParallelLinear, TensorParallelGroup
from weavelm.plugin import hookimpl
from weavelm.plugins.models.qwen2_vl_model import Qwen2VLForConditionalGeneration
from weavelm.plugins.models.qwen2_vl_vision import (Grid, PatchEmbed, PatchMerger, VisionAttention, VisionDims,
                                                    VisionRotary, activation, frame_bounds, patch_positions,
                                                    segments_by_length)


def window_index(grids: Sequence[Grid], merge_size: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """The window order of the merged patches of all images (`index[i]`: the merged patch at place i) and the
    window boundaries in patches (transformers' `get_vision_window_index`). `window`: merged patches a side."""
    order, bounds, base = [], [0], 0
    unit = merge_size ** 2
    for t, h, w in grids:
        gh, gw = h // merge_size, w // merge_size
        index = torch.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = window - gh % window, window - gw % window
        nh, nw = (gh + pad_h) // window, (gw + pad_w) // window
        padded = F.pad(index, (0, pad_w, 0, pad_h), "constant", -1)
        padded = padded.reshape(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, -1)
        sizes = (padded >= 0).sum(-1).reshape(-1)
        flat = padded.reshape(-1)
        order.append(flat[flat >= 0] + base)
        for n in sizes.tolist():
            if n:
                bounds.append(bounds[-1] + n * unit)
        base += t * gh * gw
    return torch.cat(order), bounds


class GatedVisionMLP(nn.Module):
    """act(gate(x)) * up(x) -> down, with biases (gate and up packed in one matmul, as `gate_up_proj`)."""

    def __init__(self, d: VisionDims, tp: TensorParallelGroup):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(d.embed_dim, [d.mlp_hidden, d.mlp_hidden], True, tp)
        self.down_proj = RowParallelLinear(d.mlp_hidden, d.embed_dim, True, tp)
        self.act = activation(d.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class WindowVisionBlock(nn.Module):
    def __init__(self, d: VisionDims, tp: TensorParallelGroup):
        super().__init__()
        self.norm1 = RMSNorm(d.embed_dim, 1e-6)
        self.norm2 = RMSNorm(d.embed_dim, 1e-6)
        self.attn = VisionAttention(d, tp)
        self.mlp = GatedVisionMLP(d, tp)

    def forward(self, x: torch.Tensor, segments: list[torch.Tensor], cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), segments, cos, sin)
        return x + self.mlp(self.norm2(x))


class Qwen2_5VisionTransformer(nn.Module):
    """The Qwen2.5-VL tower: `forward(pixel_values, grids)` -> (merged tokens, text hidden) in the processor's
    order, like Qwen2-VL's."""

    def __init__(self, cfg: Any, tp: TensorParallelGroup = TensorParallelGroup()):
        super().__init__()
        d = self.dims = VisionDims.from_config(cfg, cfg.hidden_size, cfg.intermediate_size, cfg.out_hidden_size)
        self.window = cfg.window_size // d.merge_size // d.patch_size
        self.full_attention = set(cfg.fullatt_block_indexes)
        self.patch_embed = PatchEmbed(d)
        self.rotary = VisionRotary(d.head_dim, d.rope_theta)
        self.blocks = nn.ModuleList(WindowVisionBlock(d, tp) for _ in range(d.depth))
        self.merger = PatchMerger(d, tp, RMSNorm(d.embed_dim, 1e-6))

    def num_tokens(self, grid: Grid) -> int:
        t, h, w = grid
        return t * h * w // self.dims.merge_size ** 2

    def forward(self, pixel_values: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        grids = [tuple(int(v) for v in g) for g in grids]
        frames = frame_bounds(grids, pixel_values.shape[0])
        unit = self.dims.merge_size ** 2
        order, windows = window_index(grids, self.dims.merge_size, self.window)

        def regroup(x: torch.Tensor) -> torch.Tensor:  # merged-patch groups of `unit` rows, in window order
            return x.reshape(-1, unit, *x.shape[1:])[order].reshape(x.shape)

        x = regroup(self.patch_embed(pixel_values))
        cos, sin = (regroup(c) for c in self.rotary(patch_positions(grids, self.dims.merge_size)))
        frames, windows = segments_by_length(frames), segments_by_length(windows)
        for i, block in enumerate(self.blocks):
            x = block(x, frames if i in self.full_attention else windows, cos, sin)
        return self.merger(x)[torch.argsort(order)]


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    name = "qwen2_5_vl"
    description = "Qwen2.5-VL: windowed ViT (RMSNorm, SwiGLU, 2D rotary) + Qwen2 decoder with M-RoPE."
    hf_architectures = ("Qwen2_5_VLForConditionalGeneration",)

    def __init__(self, hf_config: Any, tp: TensorParallelGroup = TensorParallelGroup()):
        super().__init__(hf_config, tp)
        self.tokens_per_second = hf_config.vision_config.tokens_per_second

    @staticmethod
    def build_vision_tower(vision_config: Any, tp: TensorParallelGroup) -> torch.nn.Module:
        return Qwen2_5VisionTransformer(vision_config, tp)

    def video_time_interval(self, second_per_grid_t: float) -> float:
        """A video's frames are `tokens_per_second * second_per_grid_t` positions apart."""
        return self.tokens_per_second * second_per_grid_t


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("model", Qwen2_5_VLForConditionalGeneration.name, Qwen2_5_VLForConditionalGeneration)
