"""The vision-language model contract: for a saved model folder (weights + its Hugging Face processor), the
registered `SupportsMultiModal` architecture gives transformers' greedy tokens for a batch mixing two image prompts
and a text prompt, and with a chunked prefill that splits the image's placeholder run; prefix caching keys on the
image; a bad image fails only its own request, with `MultiModalInputError`.

Subclass it in your distribution's tests and give the `checkpoint` fixture (a tiny random model saved by
transformers with its processor, fp32):

    from weavelm.testing.multimodal import MultiModalContract

    class TestMyVLM(MultiModalContract):
        prompt = "USER: <image>\\nWhat is this? ASSISTANT:"   # one image placeholder, in the processor's syntax

        @pytest.fixture(scope="class")
        def checkpoint(self, tmp_path_factory) -> str:
            ...  # save_pretrained the model and its processor; return the folder

The reference is transformers' `AutoModelForImageTextToText` with the folder's `AutoProcessor` (override
`reference` for another). Runs on the CPU in float32, so token comparisons are exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

ENGINE = dict(dtype="float32", device="cpu", cache={"num_blocks": 256, "block_size": 16})


class MultiModalContract:
    """Subclass, set `prompt` and provide the `checkpoint` fixture; pytest collects `test_*`."""

    prompt: ClassVar[str] = ""  # holds the processor's image placeholder once
    text_prompt: ClassVar[str] = "Hello there, how are"
    image_size: ClassVar[tuple[int, int]] = (64, 48)  # (width, height) of the test images
    chunk_tokens: ClassVar[int] = 16  # the chunked engine's step budget: below the image's placeholder run
    max_tokens: ClassVar[int] = 8
    plugin_modules: ClassVar[tuple[str, ...]] = ()  # modules to register explicitly (plugins not installed)

    # -- hooks --------------------------------------------------------------------------------------------
    @pytest.fixture(scope="class")
    def checkpoint(self) -> str:
        raise NotImplementedError("give the contract a `checkpoint` fixture: a saved model folder with its processor")

    def make_image(self, seed: int) -> Any:
        from PIL import Image

        w, h = self.image_size
        return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))

    @pytest.fixture(scope="class")
    def reference(self, checkpoint) -> Callable[[str, list | None], list[int]]:
        """`reference(prompt, images)`: transformers' greedy tokens (exactly `max_tokens`); override the fixture
        for another reference."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
        processor = AutoProcessor.from_pretrained(checkpoint)
        n = self.max_tokens

        def greedy(prompt: str, images: list | None) -> list[int]:
            inputs = processor(text=prompt, images=images or None, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
            return out[0, inputs["input_ids"].shape[1]:].tolist()

        return greedy

    # -- fixtures -----------------------------------------------------------------------------------------
    @pytest.fixture(scope="class")
    def mm_registry(self) -> Any:
        from weavelm.core.registry import Registry, RegistrySpec

        return Registry.from_spec(RegistrySpec(modules=self.plugin_modules))

    @pytest.fixture(scope="class")
    def mm_llm(self, checkpoint, mm_registry) -> Any:
        from weavelm import LLM

        llm = LLM(checkpoint, registry=mm_registry, **ENGINE)
        yield llm
        llm.shutdown()

    @pytest.fixture(scope="class")
    def mm_chunked_llm(self, checkpoint, mm_registry) -> Any:
        from weavelm import LLM

        llm = LLM(checkpoint, registry=mm_registry, scheduler={"max_num_batched_tokens": self.chunk_tokens},
                  **ENGINE)
        yield llm
        llm.shutdown()

    def _params(self) -> Any:
        from weavelm import SamplingParams

        return SamplingParams(max_tokens=self.max_tokens, temperature=0, ignore_eos=True)

    def _image_prompt(self, *images: Any) -> dict[str, Any]:
        return {"prompt": self.prompt, "multi_modal_data": {"image": list(images)}}

    # -- the contract -------------------------------------------------------------------------------------
    def test_batch_of_images_and_text_matches_reference(self, mm_llm, reference):
        images = [self.make_image(0), self.make_image(1)]
        outs = mm_llm.generate([self._image_prompt(images[0]), self._image_prompt(images[1]), self.text_prompt],
                               self._params(), use_tqdm=False)
        assert [o.error for o in outs] == [None] * 3
        got = [o.outputs[0].token_ids for o in outs]
        want = [reference(self.prompt, [images[0]]), reference(self.prompt, [images[1]]),
                reference(self.text_prompt, None)]
        assert got == want

    def test_chunked_prefill_over_the_image_matches_reference(self, mm_chunked_llm, reference):
        image = self.make_image(2)
        prepared = mm_chunked_llm.engine.prepare(self._image_prompt(image))
        run = prepared.mm_features[0].placeholder
        assert run.offset < self.chunk_tokens < run.end or run.length > self.chunk_tokens, \
            f"the image's placeholder run {run} does not cross a {self.chunk_tokens}-token chunk; shorten chunk_tokens"
        out = mm_chunked_llm.generate([self._image_prompt(image)], self._params(), use_tqdm=False)[0]
        assert out.error is None
        assert out.outputs[0].token_ids == reference(self.prompt, [image])

    def test_prefix_cache_keys_on_the_image(self, mm_llm):
        first, again, other = (mm_llm.generate([self._image_prompt(self.make_image(seed))], self._params(),
                                               use_tqdm=False)[0] for seed in (3, 3, 4))
        run = mm_llm.engine.prepare(self._image_prompt(self.make_image(3))).mm_features[0].placeholder
        block = ENGINE["cache"]["block_size"]
        text_only = run.offset // block * block  # blocks wholly before the image may be shared by any image
        assert first.num_cached_tokens <= text_only and other.num_cached_tokens <= text_only
        assert again.num_cached_tokens > text_only
        assert again.outputs[0].token_ids == first.outputs[0].token_ids
        assert mm_llm.get_stats().prefix_cache_hit_rate > 0

    def test_bad_image_fails_alone(self, mm_llm):
        from weavelm.errors import MultiModalInputError

        bad = self._image_prompt(b"not an image")
        with pytest.raises(MultiModalInputError, match="cannot decode"):
            mm_llm.engine.prepare(bad)
        outs = mm_llm.generate([self._image_prompt(self.make_image(5)), bad], self._params(), use_tqdm=False)
        assert outs[0].error is None and len(outs[0].outputs[0].token_ids) == self.max_tokens
        assert outs[1].outputs[0].finish_reason == "error" and "cannot decode" in outs[1].error
