"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): the vision tower of `qwen2_vl_vision.py` and the Qwen2 decoder
with multimodal rotary positions (M-RoPE, `weavelm.layers.rotary.MRotaryEmbedding`).

Each image becomes a run of `<|image_pad|>` placeholder tokens in the prompt (the processor expands one per merged
patch); the runner embeds the prompt, overwrites the placeholder rows with the tower's output
(`embed_image`) and runs `forward` on `inputs_embeds` with three position rows per token computed by
`mrope_positions` (`weavelm/plugins/models/mrope_positions.py`). Text-only batches may pass (tokens,) positions.

Checkpoint names: transformers 5 saves `model.visual.*`, `model.language_model.*` and `lm_head.*`; original
Qwen2-VL checkpoints use `visual.*`, `model.*` and `lm_head.*`. Both load.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from weavelm.layers import ParallelLMHead, TensorParallelGroup, WeightsMapper, load_checkpoint
from weavelm.layers.rotary import MRotaryEmbedding
from weavelm.plugin import ForwardBatch, ModelArchitecture
from weavelm.plugins.models.decoder import STACKED, LlamaForCausalLM
from weavelm.plugins.models.mrope_positions import (MRopePositions, VisionPlacement, mrope_positions,
                                                    text_positions)
from weavelm.plugins.models.qwen2_vl_vision import Grid, Qwen2VisionTransformer


class Qwen2VLTextModel(LlamaForCausalLM):
    """The Qwen2 decoder (q/k/v biases) with M-RoPE; `forward` also takes `inputs_embeds` and (3, tokens)
    positions. Always runs layer by layer (the native CPU stack knows only 1D rotary)."""

    name = "qwen2_vl_text"
    hf_architectures = ()

    def __init__(self, text_config: Any, tp: TensorParallelGroup, tie_word_embeddings: bool):
        super().__init__(text_config, tp)
        d = self.dims
        self.rotary = MRotaryEmbedding(text_config, d.head_dim, d.max_positions)
        self.tie_embeddings = tie_word_embeddings
        self.lm_head = None if tie_word_embeddings else ParallelLMHead(d.vocab, d.hidden, tp)

    @staticmethod
    def _biases(cfg: Any) -> tuple[bool, bool]:
        return True, False

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, batch: ForwardBatch,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, batch, self.rotary)
        x, _ = self.norm(x, residual)
        return x


class Qwen2VLForConditionalGeneration(ModelArchitecture):
    name = "qwen2_vl"
    description = "Qwen2-VL: dynamic-resolution ViT (2D rotary, patch merger) + Qwen2 decoder with M-RoPE."
    hf_architectures = ("Qwen2VLForConditionalGeneration",)
    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping
    hf_to_weavelm_mapper = WeightsMapper({"model.visual.": "visual.", "model.language_model.": "language_model.",
                                          "visual.": "visual.", "model.": "language_model.",
                                          "lm_head.": "language_model.lm_head."})
    # how many position rows `forward` takes per token (the runner asks the model for them: `request_positions`)
    position_rows = 3

    def __init__(self, hf_config: Any, tp: TensorParallelGroup = TensorParallelGroup()):
        super().__init__()
        self.hf_config, self.tp = hf_config, tp
        self.visual = self.build_vision_tower(hf_config.vision_config, tp)
        tie = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.language_model = Qwen2VLTextModel(hf_config.text_config, tp, tie)
        self.image_token_id = hf_config.image_token_id
        self.video_token_id = getattr(hf_config, "video_token_id", None)
        self.spatial_merge_size = hf_config.vision_config.spatial_merge_size

    @staticmethod
    def build_vision_tower(vision_config: Any, tp: TensorParallelGroup) -> torch.nn.Module:
        """The tower: `forward(pixel_values, grids)` -> (placeholder tokens, hidden), and `num_tokens(grid)`."""
        return Qwen2VisionTransformer(vision_config, tp)

    # -- multimodal -------------------------------------------------------------------------------------------
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(tokens,) -> (tokens, hidden): the text embedding (placeholders included, to be overwritten)."""
        return self.language_model.embed_tokens(input_ids)

    def embed_images(self, pixel_values: torch.Tensor, grids: Sequence[Grid]) -> list[torch.Tensor]:
        """The placeholder embeddings of each image: pixel_values (patches of all images, C*T*P*P) as the
        processor made them, `grids` each image's (t, h, w); returns one (t*h*w // merge**2, hidden) per image."""
        merged = self.visual(pixel_values, grids)
        return list(merged.split([self.visual.num_tokens(g) for g in grids]))

    def mrope_positions(self, prompt_token_ids: Sequence[int], image_grids: Sequence[Grid] = (),
                        video_grids: Sequence[Grid] = ()) -> MRopePositions:
        """The prompt's three position rows and the delta of the tokens after it. `image_grids` / `video_grids`:
        each image's / video's (t, h, w) patch grid, in prompt order (the processor's `image_grid_thw` rows).
        ValueError when the placeholder runs do not match the grids."""
        if not image_grids and not video_grids:
            return text_positions(len(prompt_token_ids))
        placements = [VisionPlacement(self.image_token_id, tuple(g)) for g in image_grids]
        placements += [VisionPlacement(self.video_token_id, tuple(g)) for g in video_grids]
        return mrope_positions(prompt_token_ids, placements, self.spatial_merge_size)

    # -- decoder -----------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, batch: ForwardBatch,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (tokens,) or inputs_embeds (tokens, hidden); positions (3, tokens) (or (tokens,) for text
        only). Returns hidden states (tokens, hidden)."""
        return self.language_model(input_ids, positions, batch, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden_states)

    def attention_layout(self) -> tuple[int, int, int, int]:
        return self.language_model.attention_layout()

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        skip = {"language_model.lm_head.weight"} if self.language_model.lm_head is None else ()
        return load_checkpoint(self, weights, mapper=self.hf_to_weavelm_mapper, stacked=STACKED, skip=skip)

