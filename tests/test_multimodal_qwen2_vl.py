"""Images through the engine on a tiny random Qwen2-VL (issue 27): greedy tokens equal transformers'
Qwen2VLForConditionalGeneration (fp32, CPU) for two prompts with different images and a text prompt in one batch,
and for an image prompt under a 16-token chunked-prefill budget whose chunks split the placeholder run (the M-RoPE
positions of each chunk come from the model's `get_mrope_input_positions`), also when it resumes from the prefix
cache; and a mixed batch on a tiny Qwen2.5-VL."""

from __future__ import annotations

import pytest
import torch

from tests.mm_fixtures import data_url
from tests.qwen2_vl_fixtures import hf_processor, image, image_prompt, session_model
from weavelm import LLM, SamplingParams
from weavelm.core.registry import Registry, RegistrySpec

MAX_TOKENS = 8
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
ENGINE = dict(dtype="float32", device="cpu", loader="safetensors", cache={"num_blocks": 64, "block_size": 16},
              multimodal={"limit_mm_per_prompt": {"image": 2}, "max_image_pixels": 200 * 200})
TEXT = "A text prompt without pictures:"
ONE = image_prompt(1, "Describe this picture.")
TWO = image_prompt(2, "Which is brighter?")
# 14 text tokens and <|vision_start|>, then an image of 8 x 4 merged patches: its run covers prompt positions
# 15..22, across the first 16-token chunk's end; 38 tokens in all (two full 16-token KV blocks, both with image)
LATE = ("Here is a long preamble of several words before the picture arrives:"
        + image_prompt(1, "What is it? Say it in a few short words, please."))


@pytest.fixture(scope="module")
def path(tmp_path_factory) -> str:
    return session_model(tmp_path_factory)


@pytest.fixture(scope="module")
def registry() -> Registry:
    # the `qwen2_vl` entry point is visible once the package is reinstalled; register the module explicitly meanwhile
    return Registry.from_spec(RegistrySpec(modules=("weavelm.plugins.models.qwen2_vl",
                                                    "weavelm.plugins.models.qwen2_5_vl")))


class HFQwen2VL:
    """transformers' model and processor on the same folder: the reference."""

    def __init__(self, path: str, kind: str = "qwen2_vl"):
        from transformers import AutoModelForImageTextToText

        self.processor = hf_processor(path, kind)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()

    def inputs(self, prompt: str, images: list | None):
        return self.processor(text=[prompt], images=images, return_tensors="pt")

    def greedy(self, prompt: str, images: list | None) -> list[int]:
        inputs = self.inputs(prompt, images)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def hf(path) -> HFQwen2VL:
    return HFQwen2VL(path)


def tokens(outputs) -> list[list[int]]:
    assert all(o.error is None for o in outputs), [o.error for o in outputs]
    return [o.outputs[0].token_ids for o in outputs]


def request(prompt: str, images: list) -> dict:
    return {"prompt": prompt, "multi_modal_data": {"image": images}}


def test_batch_of_image_prompts_and_text_matches_transformers(path, registry, hf, one_torch_thread):
    images = [image(0, 56, 84), image(1, 100, 70), image(2, 60, 60)]
    llm = LLM(path, registry=registry, **ENGINE)
    try:
        got = tokens(llm.generate([request(ONE, images[:1]), request(TWO, images[1:]), TEXT], GREEDY,
                                  use_tqdm=False))
        swapped = tokens(llm.generate([request(ONE, images[2:])], GREEDY, use_tqdm=False))
        # a token-id prompt with one placeholder per image, expanded by the engine
        ids = hf.processor.tokenizer.encode(TWO)
        by_ids = tokens(llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": images[1:]}}], GREEDY,
                                     use_tqdm=False))
        # a chat turn with a data URL: the image goes between the vision start and end tokens
        conv = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(images[0])}},
                                             {"type": "text", "text": "What is this?"}]}]
        chat = tokens(llm.chat(conv, GREEDY, use_tqdm=False))
    finally:
        llm.shutdown()
    want = [hf.greedy(ONE, images[:1]), hf.greedy(TWO, images[1:]), hf.greedy(TEXT, None)]
    assert got == want
    assert swapped == [hf.greedy(ONE, images[2:])]
    assert swapped[0] != got[0]  # the image steers the output
    assert by_ids == want[1:2]
    turn = {"role": "user", "content": image_prompt(1, "\nWhat is this?")}
    text = hf.processor.tokenizer.apply_chat_template([turn], add_generation_prompt=True, tokenize=False)
    assert chat == [hf.greedy(text, images[:1])]


def test_chunked_prefill_splits_the_placeholder_run(path, registry, hf, one_torch_thread):
    picture = image(3, 100, 70)
    ids = hf.inputs(LATE, [picture])["input_ids"][0].tolist()
    run = [i for i, t in enumerate(ids) if t == hf.model.config.image_token_id]
    assert run[0] < 16 <= run[-1] and run == list(range(run[0], run[-1] + 1))
    llm = LLM(path, registry=registry, scheduler={"max_num_batched_tokens": 16}, **ENGINE)
    try:
        got = tokens(llm.generate([request(LATE, [picture]), TEXT], GREEDY, use_tqdm=False))
        # prefix caching: the same image resumes past the cached blocks (its positions taken from the middle of the
        # prompt's M-RoPE rows); another image shares no block (each holds placeholder tokens)
        again, other = (llm.generate([request(LATE, [p])], GREEDY, use_tqdm=False)[0]
                        for p in (picture, image(4, 100, 70)))
    finally:
        llm.shutdown()
    assert got == [hf.greedy(LATE, [picture]), hf.greedy(TEXT, None)]
    assert again.num_cached_tokens == 32 and tokens([again]) == got[:1]
    assert other.num_cached_tokens == 0


def test_qwen2_5_vl_batch_matches_transformers(tmp_path_factory, registry, one_torch_thread):
    """Qwen2.5-VL (windowed tower): an image prompt with two images beside a text prompt."""
    path = session_model(tmp_path_factory, "qwen2_5_vl")
    hf = HFQwen2VL(path, "qwen2_5_vl")
    images = [image(4, 100, 70), image(5, 56, 84)]
    llm = LLM(path, registry=registry, **ENGINE)
    try:
        got = tokens(llm.generate([request(TWO, images), TEXT], GREEDY, use_tqdm=False))
    finally:
        llm.shutdown()
    assert got == [hf.greedy(TWO, images), hf.greedy(TEXT, None)]
