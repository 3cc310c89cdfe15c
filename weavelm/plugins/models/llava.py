"""LLaVA (`LlavaForConditionalGeneration`): a CLIP vision tower, a two-layer projector and any registered text
architecture (the one serving `text_config`, bound by the engine through `with_language_model`), as a
`SupportsMultiModal` model plugin. Image features follow transformers: the hidden state(s) of
`vision_feature_layer` (an int or a list, concatenated), without the CLS position under the "default"
`vision_feature_select_strategy`, projected to the text model's width; each image fills its run of
`image_token_index` placeholders."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from weavelm.core.model_size import build_model
from weavelm.core.multimodal import split_by_rows
from weavelm.errors import LoadError
from weavelm.layers import TensorParallelGroup, WeightsMapper, load_checkpoint
from weavelm.plugin import ForwardBatch, ModelArchitecture, hookimpl
from weavelm.plugins.models.clip import CLIPVisionTower, activation

# checkpoint prefixes, transformers 4 layout first, then transformers 5's (`model.` holds the sub-models)
TEXT_PREFIXES = {"language_model.model.": "model.", "language_model.lm_head.": "lm_head.",
                 "model.language_model.": "model.", "lm_head.": "lm_head."}
VISION_MAPPER = WeightsMapper({"model.vision_tower.vision_model.": "", "model.vision_tower.": "",
                               "vision_tower.vision_model.": "", "vision_tower.": ""})
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


class LlavaProjector(nn.Module):
    def __init__(self, vision_width: int, text_width: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(vision_width, text_width, bias=bias)
        self.act = activation(act)
        self.linear_2 = nn.Linear(text_width, text_width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(ModelArchitecture):
    name = "llava"
    description = "LLaVA: CLIP vision tower + projector + any registered text model (images via inputs_embeds)."
    hf_architectures = ("LlavaForConditionalGeneration",)
    supports_multimodal: ClassVar[bool] = True
    language_model_cls: ClassVar[type | None] = None  # set by with_language_model

    @classmethod
    def with_language_model(cls, text_cls: type) -> type:
        """This architecture over `text_cls` (the registered architecture serving `text_config`)."""
        return type(cls.__name__, (cls,), {"language_model_cls": text_cls, "__module__": cls.__module__,
                                           "__qualname__": cls.__qualname__})

    @classmethod
    def get_placeholder_token_id(cls, hf_config: Any, modality: str) -> int:
        token = getattr(hf_config, "image_token_index", None)
        return int(token if token is not None else hf_config.image_token_id)

    @classmethod
    def split_mm_inputs(cls, processor_output: Mapping[str, Any], modality: str,
                        num_items: int) -> list[dict[str, torch.Tensor]]:
        return split_by_rows(processor_output, ["pixel_values"], num_items)

    def __init__(self, hf_config: Any, tp: TensorParallelGroup = TensorParallelGroup()):
        super().__init__()
        if self.language_model_cls is None:
            raise LoadError("LlavaForConditionalGeneration needs its text architecture: build it through the "
                            "engine's model lookup (RunnerContext.model_class), which binds `with_language_model`")
        self.hf_config = hf_config
        vision, text = hf_config.vision_config, hf_config.text_config
        layer = hf_config.vision_feature_layer
        self.feature_layers = [layer] if isinstance(layer, int) else list(layer)
        self.select_strategy = hf_config.vision_feature_select_strategy
        if self.select_strategy not in ("default", "full"):
            raise LoadError(f"vision_feature_select_strategy {self.select_strategy!r} is not supported; "
                            f"'default' or 'full'")
        self.language_model = build_model(self.language_model_cls, text, tp)
        self.vision_tower = CLIPVisionTower(vision)
        n = self.vision_tower.num_layers
        self.num_vision_layers = max(li % (n + 1) for li in self.feature_layers)  # layers to run
        self.multi_modal_projector = LlavaProjector(vision.hidden_size * len(self.feature_layers), text.hidden_size,
                                                    hf_config.projector_hidden_act,
                                                    getattr(hf_config, "multimodal_projector_bias", True))

    # -- SupportsMultiModal -------------------------------------------------------------------------------
    def get_multimodal_embeddings(self, pixel_values: torch.Tensor, **_: Any) -> list[torch.Tensor]:
        states = self.vision_tower(pixel_values, self.num_vision_layers)
        n = self.vision_tower.num_layers
        chosen = [states[li % (n + 1)] for li in self.feature_layers]
        if self.select_strategy == "default":
            chosen = [s[:, 1:] for s in chosen]
        features = self.multi_modal_projector(torch.cat(chosen, dim=-1))
        return list(features)

    def get_input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings(input_ids)

    # -- ModelArchitecture --------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if inputs_embeds is None:
            return self.language_model(input_ids, positions, batch)
        return self.language_model(input_ids, positions, batch, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden_states)

    def attention_layout(self) -> tuple[int, int, int, int]:
        return self.language_model.attention_layout()

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        text, vision, projector = [], [], []
        for name, tensor in weights:
            if "vision_tower." in name[:len("model.vision_tower.")]:
                vision.append((name, tensor))
            elif name.startswith(PROJECTOR_PREFIXES):
                projector.append((name.split("multi_modal_projector.", 1)[1], tensor))
            else:
                prefix = next((p for p in TEXT_PREFIXES if name.startswith(p)), None)
                if prefix is None:
                    raise KeyError(f"unexpected tensor {name!r}: LLaVA checkpoints hold language_model.*, "
                                   f"vision_tower.* and multi_modal_projector.* tensors")
                text.append((TEXT_PREFIXES[prefix] + name[len(prefix):], tensor))
        loaded = {f"language_model.{n}" for n in self.language_model.load_weights(text)}
        loaded |= {f"vision_tower.{n}" for n in load_checkpoint(self.vision_tower, vision, mapper=VISION_MAPPER,
                                                                 stacked={})}
        loaded |= {f"multi_modal_projector.{n}" for n in load_checkpoint(
            self.multi_modal_projector, projector, mapper=WeightsMapper(), stacked={})}
        return loaded


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("model", LlavaForConditionalGeneration.name, LlavaForConditionalGeneration)
