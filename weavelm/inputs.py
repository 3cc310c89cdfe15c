"""vLLM's prompt types (`vllm.inputs`): `from weavelm.inputs import TokensPrompt` ports unchanged. They are plain
dicts at run time, accepted wherever a prompt is (`LLM.generate`, `LLM.stream`, `AsyncLLM.generate`).

`multi_modal_data` (vision-language models): `{"image": image or [images]}`, each a `PIL.Image.Image`, a uint8
HxWxC array or encoded image bytes. The prompt holds the model's image placeholder (LLaVA: `<image>`) once where
each image goes; the model's processor expands it. Limits: `multimodal.limit_mm_per_prompt` (vLLM's
`limit_mm_per_prompt`), `multimodal.max_image_pixels`, and the scheduler's encoder budget."""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict, Union


class MultiModalDataDict(TypedDict, total=False):
    """A prompt's multimodal items by modality."""

    image: Any  # PIL.Image.Image | list[PIL.Image.Image] (or uint8 arrays, encoded bytes)


class TextPrompt(TypedDict):
    """A text prompt, tokenized by the engine (with its images' placeholders expanded by the model's processor)."""

    prompt: str
    multi_modal_data: NotRequired[MultiModalDataDict]


class TokensPrompt(TypedDict):
    """A prompt given as token ids (`prompt`, when present, is only echoed back in the output); each image's
    placeholder token appears once (or already expanded to its run)."""

    prompt_token_ids: list[int]
    prompt: NotRequired[str]
    multi_modal_data: NotRequired[MultiModalDataDict]


SingletonPrompt = Union[str, TextPrompt, TokensPrompt]
PromptType = SingletonPrompt

__all__ = ["MultiModalDataDict", "PromptType", "SingletonPrompt", "TextPrompt", "TokensPrompt"]
