"""The frontend's multimodal step (vLLM's multimodal processor): check a prompt's `multi_modal_data` against the
limits, run the model's own Hugging Face processor (`AutoProcessor`, never remote code) to expand each image's
placeholder token into its run and prepare the encoder inputs, and describe each image as a `MultiModalFeature`.
Built by `InputProcessor` for models whose architecture satisfies `SupportsMultiModal`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from weavelm.core.config import MultiModalConfig
from weavelm.core.media import as_image, image_hash
from weavelm.core.multimodal import MultiModalFeature, PlaceholderRange
from weavelm.errors import MultiModalInputError, RequestError

logger = logging.getLogger("weavelm.multimodal")
MODALITIES = ("image",)


class MultiModalProcessor:
    """`process(text, token_ids, multi_modal_data)` -> (text, expanded token ids, features)."""

    def __init__(self, model_path: str, hf_config: Any, model_cls: Any, limits: MultiModalConfig):
        self.model_path, self.model_cls, self.limits = model_path, model_cls, limits
        self.placeholder_id = int(model_cls.get_placeholder_token_id(hf_config, "image"))
        self._hf_processor = None

    @property
    def hf_processor(self) -> Any:
        if self._hf_processor is None:
            from transformers import AutoProcessor

            # an architecture may load its processor itself (`load_hf_processor(path)`, e.g. where transformers'
            # class needs a library the machine lacks); else transformers' AutoProcessor
            load = getattr(self.model_cls, "load_hf_processor", None)
            try:
                self._hf_processor = load(self.model_path) if load is not None else AutoProcessor.from_pretrained(
                    self.model_path, trust_remote_code=False, local_files_only=True)
            except Exception as e:
                raise RequestError(f"multi_modal_data: this model has no usable processor beside its weights "
                                   f"({type(e).__name__}: {e}); save the model with its AutoProcessor") from e
        return self._hf_processor

    def placeholder_str(self, index: int = 0) -> str:
        """The text that marks the `index`-th image of a chat message (the model's `get_placeholder_str`, else
        the processor's `image_token`)."""
        custom = getattr(self.model_cls, "get_placeholder_str", None)
        return custom("image", index) if custom is not None else self.hf_processor.image_token

    def images(self, multi_modal_data: Any) -> list[Any]:
        """The prompt's images as PIL images, checked against the limits (count first, then each size)."""
        if not isinstance(multi_modal_data, Mapping):
            raise MultiModalInputError(f"multi_modal_data: expected a dict such as {{'image': image}} (got "
                                       f"{type(multi_modal_data).__name__})")
        unknown = sorted(str(k) for k in multi_modal_data if k not in MODALITIES)
        if unknown:
            raise MultiModalInputError(f"multi_modal_data: modality {unknown} is not supported; this model takes "
                                       f"{list(MODALITIES)}")
        items = multi_modal_data.get("image")
        if items is None:
            return []
        items = list(items) if isinstance(items, (list, tuple)) else [items]
        limit = self.limits.limit_mm_per_prompt.get("image", 0)
        if len(items) > limit:
            raise MultiModalInputError(f"multi_modal_data: {len(items)} images in one prompt, more than "
                                       f"limit_mm_per_prompt allows ({{'image': {limit}}}); send fewer images or "
                                       f"raise multimodal.limit_mm_per_prompt")
        max_pixels = self.limits.max_image_pixels
        return [as_image(item, f"multi_modal_data.image[{i}]", max_pixels).convert("RGB")
                for i, item in enumerate(items)]

    def process(self, text: str | None, token_ids: list[int] | None, multi_modal_data: Any
                ) -> tuple[str | None, list[int], list[MultiModalFeature]]:
        """Expand the placeholders and build the features; `token_ids` (when given) win over `text`."""
        images = self.images(multi_modal_data)
        if not images:
            raise MultiModalInputError("multi_modal_data: holds no image; leave multi_modal_data out for a text "
                                       "prompt")
        proc = self.hf_processor
        if token_ids is None:
            self._check_placeholder_count(text.count(proc.image_token), len(images), proc.image_token)
            out = self._run(text=text, images=images)
            ids = [int(t) for t in out["input_ids"][0].tolist()]
        else:
            out = self._run(text="\n".join([proc.image_token] * len(images)), images=images)
            lengths = [n for _, n in _runs(out["input_ids"][0].tolist(), self.placeholder_id)]
            ids = self._expand(token_ids, lengths)
        runs = _runs(ids, self.placeholder_id)
        self._check_placeholder_count(len(runs), len(images), proc.image_token)
        data = self.model_cls.split_mm_inputs(out, "image", len(images))
        features = [MultiModalFeature("image", item, PlaceholderRange(offset, length), image_hash(image))
                    for item, (offset, length), image in zip(data, runs, images)]
        return text, ids, features

    def _run(self, **kwargs: Any) -> Any:
        try:
            return self.hf_processor(return_tensors="pt", **kwargs)
        except Exception as e:
            raise MultiModalInputError(f"multi_modal_data: the model's processor refused the input "
                                       f"({type(e).__name__}: {e})") from None

    def _expand(self, token_ids: list[int], lengths: list[int]) -> list[int]:
        """Token-id prompts: each placeholder token (or an already expanded run) becomes its image's run."""
        runs = _runs(token_ids, self.placeholder_id)
        self._check_placeholder_count(len(runs), len(lengths), self.hf_processor.image_token)
        out: list[int] = []
        pos = 0
        for (offset, n), want in zip(runs, lengths):
            if n not in (1, want):
                raise MultiModalInputError(f"prompt_token_ids: a run of {n} image placeholder tokens; give one per "
                                           f"image (or exactly {want}, already expanded)")
            out += token_ids[pos:offset] + [self.placeholder_id] * want
            pos = offset + n
        return out + token_ids[pos:]

    @staticmethod
    def _check_placeholder_count(found: int, num_images: int, token: str) -> None:
        if found != num_images:
            raise MultiModalInputError(f"prompt: has {found} image placeholder(s) {token!r} but {num_images} "
                                       f"image(s) were given; put one {token!r} where each image goes")


def _runs(ids: list[int], token: int) -> list[tuple[int, int]]:
    """(offset, length) of each maximal run of `token` in `ids`."""
    runs: list[tuple[int, int]] = []
    i, n = 0, len(ids)
    while i < n:
        if ids[i] == token:
            j = i
            while j < n and ids[j] == token:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs
