"""vLLM's prompt types (`vllm.inputs`): `from weavelm.inputs import TokensPrompt` ports unchanged. They are plain
dicts at run time, accepted wherever a prompt is (`LLM.generate`, `LLM.stream`, `AsyncLLM.generate`)."""

from __future__ import annotations

from typing import NotRequired, TypedDict, Union


class TextPrompt(TypedDict):
    """A text prompt, tokenized by the engine."""

    prompt: str


class TokensPrompt(TypedDict):
    """A prompt given as token ids (`prompt`, when present, is only echoed back in the output)."""

    prompt_token_ids: list[int]
    prompt: NotRequired[str]


SingletonPrompt = Union[str, TextPrompt, TokensPrompt]
PromptType = SingletonPrompt

__all__ = ["PromptType", "SingletonPrompt", "TextPrompt", "TokensPrompt"]
