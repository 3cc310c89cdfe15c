"""The `qwen2_vl` model plugin: registers `Qwen2VLForConditionalGeneration` (built in `qwen2_vl_model.py`, which
`qwen2_5_vl.py` shares)."""

from __future__ import annotations

from weavelm.plugin import hookimpl
from weavelm.plugins.models.qwen2_vl_model import Qwen2VLForConditionalGeneration, Qwen2VLTextModel

__all__ = ["Qwen2VLForConditionalGeneration", "Qwen2VLTextModel"]


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("model", Qwen2VLForConditionalGeneration.name, Qwen2VLForConditionalGeneration)
