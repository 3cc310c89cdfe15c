"""Images through the engine on a tiny random Qwen2-VL (issue 27), against transformers'
Qwen2VLForConditionalGeneration (fp32, CPU): the vision-language contract (`weavelm.testing.multimodal`: a batch of
two image prompts and a text prompt, a 16-token chunked prefill that splits the placeholder run, prefix caching
keyed on the image, a bad image failing alone), then Qwen2-VL's own cases: prompts with two images, token-id
prompts, chat turns, and a prefix-cache hit that resumes mid-prompt (its M-RoPE rows taken from the middle of the
prompt's, `get_mrope_input_positions`); and a mixed batch on a tiny Qwen2.5-VL."""

from __future__ import annotations

import pytest
import torch

from tests.mm_fixtures import data_url
from tests.qwen2_vl_fixtures import hf_processor, image, image_prompt, session_model
from weavelm import LLM, SamplingParams
from weavelm.core.registry import Registry, RegistrySpec
from weavelm.testing.multimodal import MultiModalContract

MAX_TOKENS = 8
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
TEXT = "A text prompt without pictures:"
ONE = image_prompt(1, "Describe this picture.")
TWO = image_prompt(2, "Which is brighter?")
# 14 text tokens and <|vision_start|>, then an image of 8 x 4 merged patches: its run covers prompt positions
# 15..22, across the first 16-token chunk's end; 38 tokens in all (two full 16-token KV blocks, both with image)
LATE = ("Here is a long preamble of several words before the picture arrives:"
        + image_prompt(1, "What is it? Say it in a few short words, please."))


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


def tokens(outputs) -> list[list[int]]:
    assert all(o.error is None for o in outputs), [o.error for o in outputs]
    return [o.outputs[0].token_ids for o in outputs]


def request(prompt: str, images: list) -> dict:
    return {"prompt": prompt, "multi_modal_data": {"image": images}}


@pytest.mark.usefixtures("one_torch_thread")
class TestQwen2VL(MultiModalContract):
    prompt = image_prompt(1, "What is this?")
    image_size = (112, 112)  # 8 x 8 patches: a 16-token placeholder run at 1..16, split by 16-token chunks
    # the `qwen2_vl` entry point is visible once the package is reinstalled; register the module explicitly meanwhile
    plugin_modules = ("weavelm.plugins.models.qwen2_vl",)

    @pytest.fixture(scope="class")
    def checkpoint(self, tmp_path_factory) -> str:
        return session_model(tmp_path_factory)

    @pytest.fixture(scope="class")
    def hf(self, checkpoint) -> HFQwen2VL:
        return HFQwen2VL(checkpoint)

    @pytest.fixture(scope="class")
    def reference(self, hf):
        return hf.greedy  # transformers' processor class needs torchvision: built by `hf_processor`

    def test_two_image_prompts_token_ids_and_chat(self, mm_llm, hf):
        images = [image(0, 56, 84), image(1, 100, 70), image(2, 60, 60)]
        got = tokens(mm_llm.generate([request(ONE, images[:1]), request(TWO, images[1:]), TEXT], GREEDY,
                                     use_tqdm=False))
        want = [hf.greedy(ONE, images[:1]), hf.greedy(TWO, images[1:]), hf.greedy(TEXT, None)]
        assert got == want
        # a token-id prompt with one placeholder per image, expanded by the engine
        ids = hf.processor.tokenizer.encode(TWO)
        assert tokens(mm_llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": images[1:]}}],
                                      GREEDY, use_tqdm=False)) == want[1:2]
        # a chat turn with a data URL: the image goes between the vision start and end tokens
        conv = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(images[0])}},
                                             {"type": "text", "text": "What is this?"}]}]
        turn = {"role": "user", "content": image_prompt(1, "\nWhat is this?")}
        text = hf.processor.tokenizer.apply_chat_template([turn], add_generation_prompt=True, tokenize=False)
        assert tokens(mm_llm.chat(conv, GREEDY, use_tqdm=False)) == [hf.greedy(text, images[:1])]

    def test_prefix_hit_resumes_mid_prompt(self, mm_chunked_llm, hf):
        picture = image(3, 100, 70)
        ids = hf.inputs(LATE, [picture])["input_ids"][0].tolist()
        run = [i for i, t in enumerate(ids) if t == hf.model.config.image_token_id]
        assert run[0] < 16 <= run[-1] and run == list(range(run[0], run[-1] + 1))
        first, again, other = (mm_chunked_llm.generate([request(LATE, [p]), TEXT], GREEDY, use_tqdm=False)
                               for p in (picture, picture, image(4, 100, 70)))
        assert tokens(first) == [hf.greedy(LATE, [picture]), hf.greedy(TEXT, None)]
        # the same image resumes past both cached blocks; another image shares none (each holds placeholders)
        assert again[0].num_cached_tokens == 32 and tokens(again) == tokens(first)
        assert other[0].num_cached_tokens == 0


def test_qwen2_5_vl_batch_matches_transformers(tmp_path_factory, one_torch_thread):
    """Qwen2.5-VL (windowed tower): an image prompt with two images beside a text prompt."""
    path = session_model(tmp_path_factory, "qwen2_5_vl")
    hf = HFQwen2VL(path, "qwen2_5_vl")
    images = [image(4, 100, 70), image(5, 56, 84)]
    registry = Registry.from_spec(RegistrySpec(modules=("weavelm.plugins.models.qwen2_5_vl",)))
    llm = LLM(path, registry=registry, dtype="float32", device="cpu", cache={"num_blocks": 64, "block_size": 16})
    try:
        got = tokens(llm.generate([request(TWO, images), TEXT], GREEDY, use_tqdm=False))
    finally:
        llm.shutdown()
    assert got == [hf.greedy(TWO, images), hf.greedy(TEXT, None)]
