"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): the vision tower of `qwen2_vl_vision.py` and the Qwen2 decoder
with multimodal rotary positions (M-RoPE, `weavelm.layers.rotary.MRotaryEmbedding`).

A `SupportsMultiModal` and `SupportsMRoPE` model (`weavelm.core.multimodal`). Each image becomes a run of
`<|image_pad|>` placeholder tokens in the prompt (the processor expands one per merged patch:
`qwen2_vl_processor.py`); the runner embeds the prompt, overwrites the placeholder rows with the tower's output
(`get_multimodal_embeddings`) and runs `forward` on `inputs_embeds` with three position rows per token, from
`get_mrope_input_positions` (`mrope_positions.py`). (tokens,) positions are accepted too (text only: the three
rows are equal).

Checkpoint names: transformers 5 saves `model.visual.*`, `model.language_model.*` and `lm_head.*`; original
Qwen2-VL checkpoints use `visual.*`, `model.*` and `lm_head.*`. Both load.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from weavelm.errors import MultiModalInputError
from weavelm.layers import ParallelLMHead, TensorParallelGroup, WeightsMapper, load_checkpoint
from weavelm.layers.rotary import MRotaryEmbedding
from weavelm.plugin import ForwardBatch, ModelArchitecture
from weavelm.plugins.models.decoder import STACKED, LlamaForCausalLM
from weavelm.plugins.models.mrope_positions import (MRopePositions, VisionPlacement, mrope_positions,
                                                    text_positions)
from weavelm.plugins.models.qwen2_vl_processor import load_processor
from weavelm.plugins.models.qwen2_vl_vision import Grid, Qwen2VisionTransformer

ENCODER_KEYS = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}


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
    supports_multimodal: ClassVar[bool] = True
    uses_mrope: ClassVar[bool] = True  # forward takes (3, tokens) positions: get_mrope_input_positions

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

    # -- SupportsMultiModal: frontend -------------------------------------------------------------------------
    @classmethod
    def load_hf_processor(cls, model_path: str) -> Any:
        """transformers' processor, or the same image path without torchvision (`qwen2_vl_processor.py`)."""
        return load_processor(model_path)

    @classmethod
    def get_placeholder_str(cls, modality: str, index: int) -> str:
        """How a chat message's item is written (Qwen2-VL's chat template: its token between vision start / end)."""
        pad = "<|video_pad|>" if modality == "video" else "<|image_pad|>"
        return f"<|vision_start|>{pad}<|vision_end|>"

    @classmethod
    def get_placeholder_token_id(cls, hf_config: Any, modality: str) -> int:
        return int(hf_config.video_token_id if modality == "video" else hf_config.image_token_id)

    @classmethod
    def split_mm_inputs(cls, processor_output: Mapping[str, Any], modality: str,
                        num_items: int) -> list[dict[str, torch.Tensor]]:
        """Per item: its patches' rows of `pixel_values` (t * h * w of them) and its `image_grid_thw` row."""
        values_key, grid_key = ENCODER_KEYS[modality]
        grids = torch.as_tensor(processor_output[grid_key])
        values = torch.as_tensor(processor_output[values_key])
        if grids.shape[0] != num_items or int(grids.prod(-1).sum()) != values.shape[0]:
            raise MultiModalInputError(f"{values_key}: the processor gave {values.shape[0]} patch rows and "
                                       f"{grids.shape[0]} grids for {num_items} items; check the model folder's "
                                       f"preprocessor_config.json")
        rows = values.split(grids.prod(-1).tolist())
        return [{values_key: r.contiguous(), grid_key: g[None].contiguous()} for r, g in zip(rows, grids)]

    # -- SupportsMultiModal: runner ----------------------------------------------------------------------------
    def get_input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(tokens,) -> (tokens, hidden): the text embedding (placeholders included, to be overwritten)."""
        return self.language_model.embed_tokens(input_ids)

    def get_multimodal_embeddings(self, pixel_values: torch.Tensor | None = None,
                                  image_grid_thw: torch.Tensor | None = None,
                                  **videos: torch.Tensor) -> list[torch.Tensor]:
        """One (placeholders, hidden) tensor per item of a batch of images (or of videos: `pixel_values_videos`,
        `video_grid_thw`), in order."""
        if pixel_values is None:
            pixel_values, image_grid_thw = videos["pixel_values_videos"], videos["video_grid_thw"]
        return self.embed_images(pixel_values, image_grid_thw.tolist())

    def embed_images(self, pixel_values: torch.Tensor, grids: Sequence[Grid]) -> list[torch.Tensor]:
        """The placeholder embeddings of each image: pixel_values (patches of all images, C*T*P*P) as the
        processor made them, `grids` each image's (t, h, w); returns one (t*h*w // merge**2, hidden) per image."""
        merged = self.visual(pixel_values, grids)
        return list(merged.split([self.visual.num_tokens(g) for g in grids]))

    # -- SupportsMRoPE ------------------------------------------------------------------------------------------
    def get_mrope_input_positions(self, prompt_token_ids: Sequence[int], mm_features: Sequence[Any] | None
                                  ) -> tuple[torch.Tensor, int]:
        """(3, prompt length) int64 positions of the prompt and the delta of later tokens (p + delta on every
        row), from the prompt and its items' grids (`MultiModalFeature.data`)."""
        positions = self.request_positions(prompt_token_ids, mm_features)
        return torch.from_numpy(positions.prompt), positions.delta

    def request_positions(self, prompt_token_ids: Sequence[int], mm_features: Sequence[Any] | None
                          ) -> MRopePositions:
        """The request's `MRopePositions` (`rows(index)` gives any token's three positions)."""
        images, videos, seconds = [], [], []
        for f in mm_features or ():
            if f.modality == "video":
                videos.append(f.data["video_grid_thw"][0].tolist())
                seconds.append(float(f.data["second_per_grid_ts"][0]) if "second_per_grid_ts" in f.data else 1.0)
            else:
                images.append(f.data["image_grid_thw"][0].tolist())
        return self.mrope_positions(prompt_token_ids, images, videos, seconds)

    def video_time_interval(self, second_per_grid_t: float) -> float:
        """Temporal-row positions between a video's frames (Qwen2-VL: 1)."""
        return 1.0

    def mrope_positions(self, prompt_token_ids: Sequence[int], image_grids: Sequence[Grid] = (),
                        video_grids: Sequence[Grid] = (), second_per_grid_ts: Sequence[float] = ()
                        ) -> MRopePositions:
        """The prompt's three position rows and the delta of the tokens after it. `image_grids` / `video_grids`:
        each image's / video's (t, h, w) patch grid, in prompt order (the processor's `image_grid_thw` rows);
        `second_per_grid_ts`: each video's seconds per temporal patch (default 1). ValueError when the
        placeholder runs do not match the grids."""
        if not image_grids and not video_grids:
            return text_positions(len(prompt_token_ids))
        seconds = list(second_per_grid_ts) or [1.0] * len(video_grids)
        placements = [VisionPlacement(self.image_token_id, tuple(g)) for g in image_grids]
        placements += [VisionPlacement(self.video_token_id, tuple(g), self.video_time_interval(s))
                       for g, s in zip(video_grids, seconds)]
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
