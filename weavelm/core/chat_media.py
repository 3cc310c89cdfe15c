"""OpenAI-style chat content parts with images (`{"type": "image_url", "image_url": {"url": ...}}`), for `LLM.chat`
and the server's /v1/chat/completions. Each message's parts become the text the chat template sees, vLLM's
"string" content format: the model's image placeholder once per image, then the text parts, joined by newlines;
the images (decoded and checked by `weavelm.core.media`) become the prompt's `multi_modal_data`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from weavelm.core.config import MultiModalConfig
from weavelm.core.media import load_image_url
from weavelm.errors import MultiModalInputError, RequestError


@dataclass
class ChatMedia:
    """A conversation with its content parts flattened to text, and the images its parts named, in order."""

    conversation: list[dict[str, Any]]
    images: list[Any] = field(default_factory=list)

    def add_to(self, prompt: dict[str, Any]) -> dict[str, Any]:
        """The rendered prompt with its images as `multi_modal_data` (unchanged when there are none)."""
        return {**prompt, "multi_modal_data": {"image": self.images}} if self.images else prompt


def has_media(conversation: list[dict[str, Any]]) -> bool:
    return any(isinstance(m.get("content"), list) and any(_part_type(p) != "text" for p in m["content"])
               for m in conversation)


def flatten_chat_media(conversation: list[dict[str, Any]], placeholder: str | None,
                       limits: MultiModalConfig) -> ChatMedia:
    """Replace each message's list of content parts by its text; decode the images of `image_url` parts.
    MultiModalInputError for a bad image or URL, more images than `limit_mm_per_prompt`, or images sent to a model
    without a placeholder (a text-only model)."""
    urls: list[tuple[str, Any]] = []
    turns = []
    for i, message in enumerate(conversation):
        content = message.get("content")
        if not isinstance(content, list):
            turns.append(message)
            continue
        texts, n_images = [], 0
        for j, part in enumerate(content):
            kind = _part_type(part)
            where = f"messages[{i}].content[{j}]"
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise RequestError(f"{where}.text: must be a string")
                texts.append(text)
            elif kind == "image_url":
                url = part.get("image_url")
                urls.append((f"{where}.image_url", url.get("url") if isinstance(url, dict) else url))
                n_images += 1
            else:
                raise RequestError(f"{where}.type: {kind!r} is not supported; use 'text' or 'image_url'")
        if n_images and placeholder is None:
            raise MultiModalInputError(f"messages[{i}]: this model takes no images; send text content only")
        turns.append({**message, "content": "\n".join([placeholder] * n_images + texts)})
    limit = limits.limit_mm_per_prompt.get("image", 0)
    if len(urls) > limit:
        raise MultiModalInputError(f"messages: {len(urls)} images in one conversation, more than "
                                   f"limit_mm_per_prompt allows ({{'image': {limit}}}); send fewer images")
    images = [load_image_url(url, where, limits.allowed_local_media_path, limits.max_image_pixels)
              for where, url in urls]
    return ChatMedia(turns, images)


def _part_type(part: Any) -> str:
    if not isinstance(part, dict):
        raise RequestError(f"messages: a content part must be an object with a `type` (got {type(part).__name__})")
    return str(part.get("type", "text"))
