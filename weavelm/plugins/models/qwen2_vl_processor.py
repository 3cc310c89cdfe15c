"""Qwen2-VL's input processor for machines where transformers cannot build `Qwen2VLProcessor`.

transformers' `Qwen2VLProcessor` (and Qwen2.5-VL's) requires torchvision even for images only: its constructor
checks the video processor's class, which does not exist without torchvision. `load_processor(path)` returns
transformers' processor where it loads, else `Qwen2VLImageTextProcessor`, which does for images what that
processor's `__call__` does: run the saved image processor (`preprocessor_config.json`, transformers' own
`Qwen2VLImageProcessor`), replace each `<|image_pad|>` of the text by `t * h * w // merge_size**2` of them for its
image's grid, tokenize, and add `mm_token_type_ids` (1 on image placeholders).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

IMAGE_TOKEN = "<|image_pad|>"
_MARK = "<|weavelm_image_slot|>"


class Qwen2VLImageTextProcessor:
    """`processor(text=..., images=..., return_tensors="pt")` -> BatchFeature with `input_ids`, `attention_mask`,
    `mm_token_type_ids`, `pixel_values` (patches of all images, C*T*P*P) and `image_grid_thw` (images, 3)."""

    def __init__(self, image_processor: Any, tokenizer: Any):
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.merge_size = image_processor.merge_size

    @classmethod
    def from_pretrained(cls, path: str) -> Qwen2VLImageTextProcessor:
        from transformers import AutoImageProcessor, AutoTokenizer

        return cls(AutoImageProcessor.from_pretrained(path, local_files_only=True),
                   AutoTokenizer.from_pretrained(path, local_files_only=True))

    def __call__(self, text: str | Sequence[str] | None = None, images: Any = None, return_tensors: str = "pt",
                 **tokenizer_kwargs: Any):
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text or [])
        data: dict[str, Any] = {}
        if images is not None:
            processed = self.image_processor(images=images, return_tensors="pt")
            data.update(processed)
            counts = (processed["image_grid_thw"].prod(-1) // self.merge_size ** 2).tolist()
            found = sum(t.count(self.image_token) for t in texts)
            if found != len(counts):
                raise ValueError(f"the text holds {found} {self.image_token} tokens for {len(counts)} images")
            it = iter(counts)
            expanded = []
            for t in texts:
                while self.image_token in t:
                    t = t.replace(self.image_token, _MARK * next(it), 1)
                expanded.append(t.replace(_MARK, self.image_token))
            texts = expanded
        tokens = self.tokenizer(texts, return_tensors=return_tensors, **tokenizer_kwargs)
        data.update(tokens)
        ids = tokens["input_ids"]
        data["mm_token_type_ids"] = (torch.as_tensor(ids) == self.image_token_id).to(torch.int64) \
            if return_tensors == "pt" else [[int(i == self.image_token_id) for i in row] for row in ids]
        return BatchFeature(data, tensor_type=return_tensors)


def load_processor(path: str) -> Any:
    """transformers' processor of the model folder where it loads, else `Qwen2VLImageTextProcessor` (ImportError
    from transformers: torchvision missing)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except ImportError:
        return Qwen2VLImageTextProcessor.from_pretrained(path)
