"""Multimodal data as the engine core sees it, and the contract a vision-language architecture implements.

Flow (vLLM v1's): the frontend runs the model's Hugging Face processor (`weavelm.core.mm_processor`), which expands
each image's placeholder token into its run of placeholder tokens and prepares the encoder's inputs. The request
then carries one `MultiModalFeature` per item: its encoder inputs (tensors), the placeholder run it fills
(`PlaceholderRange`) and a content hash. The scheduler runs an item's encoder in the step whose chunk first reaches
its run (`SchedulerOutput.scheduled_encoder_inputs`, under an encoder budget) and tells the runner when every chunk
that reads it has run (`SchedulerOutput.free_encoder_input_ids`); the runner keeps the encoder outputs in between
and scatters them into the placeholder positions of each chunk (`inputs_embeds`). Prefix-cache block hashes
include the hashes of the items a block's tokens cover, so equal text with different images never shares KV.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class PlaceholderRange:
    """Where an item's embeddings go in the prompt: token positions [offset, offset + length)."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class MultiModalFeature:
    """One multimodal item of a request (vLLM's `MultiModalFeatureSpec`).

    - `modality`: "image" (the only one the frontend produces today).
    - `data`: the item's encoder inputs, keyword arguments of `SupportsMultiModal.get_multimodal_embeddings`, each
      a tensor whose dim 0 indexes this item's rows (LLaVA: `pixel_values` (1, 3, H, W); Qwen2-VL:
      `pixel_values` (num_patches, patch_dim) and `image_grid_thw` (1, 3)). Items of one modality are batched by
      concatenating each key along dim 0.
    - `placeholder`: the run of placeholder tokens the encoder output fills, one embedding per token.
    - `identifier`: a hash of the item's content (hex), used by prefix caching and the encoder cache.
    """

    modality: str
    data: dict[str, torch.Tensor]
    placeholder: PlaceholderRange
    identifier: str
    extra: dict[str, Any] = field(default_factory=dict)  # model-specific values the runner may need (e.g. grids)

    @property
    def num_embeds(self) -> int:
        """Encoder output rows (= placeholder tokens) of this item: what it costs of the encoder budget."""
        return self.placeholder.length

    def to_row(self) -> list:
        """Plain values for the engine-core wire format (core/serial.py); `from_row` rebuilds it."""
        return [self.modality, self.data, self.placeholder.offset, self.placeholder.length, self.identifier,
                self.extra]

    @classmethod
    def from_row(cls, row: Sequence) -> MultiModalFeature:
        modality, data, offset, length, identifier, extra = row
        return cls(modality, dict(data), PlaceholderRange(int(offset), int(length)), identifier, dict(extra))


@runtime_checkable
class SupportsMultiModal(Protocol):
    """What a vision-language `ModelArchitecture` adds (import it from `weavelm.plugin`); the runner and the
    frontend reach the model only through these.

    Frontend (the caller's process), as classmethods on the architecture class:
    - `get_placeholder_token_id(hf_config, modality)`: the token id whose runs the processor's output holds for
      each item (LLaVA: `image_token_index`; Qwen2-VL: `image_token_id`).
    - optional `get_placeholder_str(modality, index)`: the text a chat message's i-th item becomes before the chat
      template runs (Qwen2-VL: "<|vision_start|><|image_pad|><|vision_end|>"); default: the processor's
      `image_token` (LLaVA: "<image>").
    - `split_mm_inputs(processor_output, modality, num_items)`: the processor's batched output (a mapping of
      tensors, e.g. `pixel_values`) as one dict of encoder inputs per item, in prompt order. `split_by_rows` is the
      default for processors that return one row per item.

    Runner (the worker's process):
    - `get_multimodal_embeddings(**mm_kwargs) -> list[Tensor]`: run the encoder (vision tower + projector) on a
      batch of items (each key concatenated along dim 0 over the items); returns one (num_embeds, hidden) tensor
      per item, in order, in the model's dtype, where num_embeds is the item's placeholder length.
    - `get_input_embeddings(input_ids) -> Tensor`: the text embeddings (num_tokens, hidden) of flat token ids.
    - `forward(input_ids, positions, batch, inputs_embeds=None)`: as `ModelArchitecture.forward`; when
      `inputs_embeds` (num_tokens, hidden) is given it replaces the embedding of `input_ids`.
    """

    supports_multimodal: ClassVar[bool]

    @classmethod
    def get_placeholder_token_id(cls, hf_config: Any, modality: str) -> int: ...

    @classmethod
    def split_mm_inputs(cls, processor_output: Mapping[str, Any], modality: str,
                        num_items: int) -> list[dict[str, torch.Tensor]]: ...

    def get_multimodal_embeddings(self, **mm_kwargs: torch.Tensor) -> list[torch.Tensor]: ...

    def get_input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: Any,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor: ...


@runtime_checkable
class SupportsMRoPE(Protocol):
    """A multimodal model whose rotary positions are 3-D (Qwen2-VL's M-RoPE: temporal, height, width). The runner
    then hands `forward` positions of shape (3, num_tokens) instead of (num_tokens,) and runs every step eagerly
    (no CUDA graphs); attention metadata still uses the 1-D token positions.

    - `uses_mrope = True`.
    - `get_mrope_input_positions(prompt_token_ids, mm_features) -> (positions, delta)`: called once per request
      when the runner first sees it; `positions` (3, len(prompt_token_ids)) int64 for the prompt, and `delta`: a
      later position p (output tokens) is (p + delta) on all three axes. `mm_features` is [] for a text prompt.
    """

    uses_mrope: ClassVar[bool]

    def get_mrope_input_positions(self, prompt_token_ids: list[int], mm_features: list[MultiModalFeature]
                                  ) -> tuple[torch.Tensor, int]: ...


def uses_mrope(model: Any) -> bool:
    """Whether an architecture (class or instance) declares `uses_mrope = True`."""
    return bool(getattr(model, "uses_mrope", False))


def supports_multimodal(model: Any) -> bool:
    """Whether an architecture (class or instance) declares `supports_multimodal = True`."""
    return bool(getattr(model, "supports_multimodal", False))


def split_by_rows(processor_output: Mapping[str, Any], keys: Sequence[str], num_items: int
                  ) -> list[dict[str, torch.Tensor]]:
    """`split_mm_inputs` for processors whose tensors hold one row per item (`pixel_values` (items, 3, H, W))."""
    items: list[dict[str, torch.Tensor]] = [{} for _ in range(num_items)]
    for key in keys:
        value = processor_output[key]
        tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        assert tensor.shape[0] == num_items, f"{key}: {tensor.shape[0]} rows for {num_items} items"
        for i in range(num_items):
            items[i][key] = tensor[i:i + 1].contiguous()
    return items


def batch_mm_kwargs(items: Sequence[Mapping[str, torch.Tensor]], device: torch.device,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Concatenate the items' encoder inputs key by key along dim 0, on `device`; floating tensors take `dtype`."""
    out = {}
    for key in items[0]:
        t = torch.cat([item[key] for item in items], dim=0)
        out[key] = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
    return out


def block_mm_keys(features: Sequence[MultiModalFeature] | None, start: int, end: int) -> tuple[str, ...]:
    """The content hashes of the items whose placeholder runs overlap token positions [start, end) (a KV block):
    they join the block's prefix-cache hash."""
    if not features:
        return ()
    return tuple(f.identifier for f in features if f.placeholder.offset < end and f.placeholder.end > start)


def text_config_of(hf_config: Any) -> Any:
    """The text model's config of a composite config (LlavaConfig.text_config), else the config itself."""
    get = getattr(hf_config, "get_text_config", None)
    return get() if callable(get) else hf_config


def text_architecture(text_config: Any) -> str:
    """The transformers architecture name of a text config: its `architectures[0]`, else the causal-LM class
    transformers maps its `model_type` to (a LlavaConfig's text_config usually names no architectures)."""
    archs = getattr(text_config, "architectures", None)
    if archs:
        return archs[0]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(text_config, "model_type", ""))
    return name if isinstance(name, str) else f"<model_type {getattr(text_config, 'model_type', None)!r}>"


def resolve_language_model(cls: type, hf_config: Any, find_model: Any) -> type:
    """A composite architecture (one with `with_language_model`, e.g. LLaVA) bound to the registered architecture
    serving its text config; any other class unchanged. `find_model(architecture_name)` is the registry's lookup,
    so the text model is whichever plugin serves it (no plugin imports another)."""
    bind = getattr(cls, "with_language_model", None)
    if bind is None:
        return cls
    return bind(find_model(text_architecture(text_config_of(hf_config))))
