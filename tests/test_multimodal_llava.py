"""Images through the engine (issue 27) on a tiny random LLaVA (CLIP vision tower + Llama text model) saved by
transformers with its LlavaProcessor and SmolLM2's tokenizer plus `<image>`. The shipped contract
(`weavelm.testing.multimodal`) checks greedy tokens against transformers' LlavaForConditionalGeneration (fp32, CPU)
for two images and a text prompt in one batch and with a 16-token chunked prefill that splits the placeholder run,
prefix caching keyed on the image, and a bad image failing alone. Here, on top: token-id prompts, two images with an
encoder cache that holds one, chat image_url parts, every bad input's typed error, the scheduler's encoder fields,
the wire format, the M-RoPE hook, and image features of CLIP / SigLIP towers per feature-layer setting."""

from __future__ import annotations

import pytest
import torch

from tests.mm_fixtures import IMAGE_TOKENS, HFLlava, data_url, llava_registry, make_image, tiny_llava  # noqa: F401
from weavelm import LLM, SamplingParams
from weavelm.errors import MultiModalInputError, RequestError
from weavelm.testing.multimodal import MultiModalContract

PROMPT = "USER: <image>\nWhat is this? ASSISTANT:"
TWO_IMAGES = "USER: <image>\nand <image>\nCompare them. ASSISTANT:"
MAX_TOKENS = 8
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
ENGINE = dict(dtype="float32", device="cpu", loader="safetensors", cache={"num_blocks": 256, "block_size": 16},
              multimodal={"limit_mm_per_prompt": {"image": 2}, "max_image_pixels": 80 * 80})


@pytest.fixture(scope="module")
def llava(tiny_llava) -> str:
    return tiny_llava


@pytest.fixture(scope="module")
def registry(llava_registry):
    return llava_registry


@pytest.fixture(scope="module")
def hf(llava) -> HFLlava:
    return HFLlava(llava)


@pytest.fixture(scope="module")
def llm(llava, registry, one_torch_thread):
    llm = LLM(llava, registry=registry, **ENGINE)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def chunked(llava, registry, one_torch_thread):
    """16-token steps, and an encoder cache that holds one image: a second image waits for the first to be read."""
    llm = LLM(llava, registry=registry, scheduler={"max_num_batched_tokens": 16, "encoder_cache_size": IMAGE_TOKENS,
                                                   "max_num_encoder_input_tokens": IMAGE_TOKENS}, **ENGINE)
    yield llm
    llm.shutdown()


class TestLlavaContract(MultiModalContract):
    """The shipped vision-language contract on the tiny LLaVA."""

    prompt = PROMPT
    plugin_modules = ("weavelm.plugins.models.llava",)

    @pytest.fixture(scope="class")
    def checkpoint(self, tiny_llava, one_torch_thread) -> str:
        return tiny_llava


def image_prompt(text: str, *images) -> dict:
    return {"prompt": text, "multi_modal_data": {"image": list(images)}}


def tokens(outputs) -> list[list[int]]:
    assert all(o.error is None for o in outputs), [o.error for o in outputs]
    return [o.outputs[0].token_ids for o in outputs]


def test_token_id_prompt_and_text_prompt_match_transformers(llm, hf):
    """A token-id prompt carries one placeholder per image; the engine expands it as the processor does."""
    image = make_image(0)
    ids = hf.processor.tokenizer.encode(PROMPT)
    assert ids.count(llm.engine.processor.mm.placeholder_id) == 1
    got = tokens(llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": image}},
                               image_prompt(PROMPT, image)], GREEDY, use_tqdm=False))
    assert got == [hf.greedy(PROMPT, [image], MAX_TOKENS)] * 2


def test_chunked_prefill_splits_the_placeholder_run(chunked, hf):
    one, two = make_image(2), make_image(3)
    got = tokens(chunked.generate([image_prompt(PROMPT, one), image_prompt(TWO_IMAGES, one, two)], GREEDY,
                                  use_tqdm=False))
    prompt_ids = chunked.engine.prepare(image_prompt(PROMPT, one)).token_ids
    run = prompt_ids.index(chunked.engine.processor.mm.placeholder_id)
    assert run < 16 < run + IMAGE_TOKENS  # the 16-token chunks cut the run
    assert got == [hf.greedy(PROMPT, [one], MAX_TOKENS), hf.greedy(TWO_IMAGES, [one, two], MAX_TOKENS)]


def test_chat_with_a_data_url_matches_transformers(llm, hf):
    image = make_image(6)
    conv = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                         {"type": "text", "text": "What is this?"}]}]
    out = llm.chat(conv, GREEDY, use_tqdm=False)
    text = hf.processor.tokenizer.apply_chat_template([{"role": "user", "content": "<image>\nWhat is this?"}],
                                                      add_generation_prompt=True, tokenize=False)
    assert tokens(out) == [hf.greedy(text, [image], MAX_TOKENS)]


def test_bad_images_fail_alone_with_typed_errors(llm, tmp_path):
    good = image_prompt(PROMPT, make_image(7))
    bad = {"undecodable": image_prompt(PROMPT, b"\x89PNG not really an image"),
           "too many": image_prompt("<image> <image> <image>", make_image(1), make_image(2), make_image(3)),
           "too large": image_prompt(PROMPT, make_image(8, size=(100, 100))),
           "placeholder count": image_prompt("no placeholder here", make_image(9))}
    with pytest.raises(MultiModalInputError, match="no image"):
        llm.engine.prepare(PROMPT, GREEDY)
    messages = {"undecodable": "cannot decode", "too many": "limit_mm_per_prompt", "too large": "max_image_pixels",
                "placeholder count": "placeholder"}
    for name, prompt in bad.items():
        with pytest.raises(MultiModalInputError, match=messages[name]):
            llm.engine.prepare(prompt, GREEDY)
    outs = llm.generate([good, *bad.values(), good], GREEDY, use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in outs] == ["length"] + ["error"] * len(bad) + ["length"]
    assert outs[0].outputs[0].token_ids == outs[-1].outputs[0].token_ids
    for out, name in zip(outs[1:], bad):
        assert messages[name] in out.error
    # chat: a remote URL is never fetched; a local file only under allowed_local_media_path
    image_path = tmp_path / "cat.png"
    make_image(7).save(image_path)
    convs = [[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                           {"type": "text", "text": "What is this?"}]}]
             for url in ("https://example.com/cat.png", f"file://{image_path}", data_url(make_image(7)))]
    outs = llm.chat(convs, GREEDY, use_tqdm=False)
    assert "remote URLs are not fetched" in outs[0].error and "allowed_local_media_path" in outs[1].error
    assert outs[2].error is None and len(outs[2].outputs[0].token_ids) == MAX_TOKENS


def test_text_only_model_refuses_images(smol_tokenizer_model, registry, one_torch_thread):
    llm = LLM(smol_tokenizer_model, registry=registry, dtype="float32", device="cpu", cache={"num_blocks": 64})
    try:
        with pytest.raises(RequestError, match="takes no images"):
            llm.engine.prepare(image_prompt("<image> hi", make_image(0)))
    finally:
        llm.shutdown()


def test_request_with_images_crosses_the_process_wire(llm):
    from weavelm.core import serial
    from weavelm.core.request import Request

    prepared = llm.engine.prepare(image_prompt(PROMPT, make_image(0)), GREEDY)
    request = Request("r", prepared.token_ids, prepared.params, mm_features=prepared.mm_features)
    ser = serial.SERIALIZER()
    _, rows = ser.decode(ser.encode(serial.ADD, [serial.request_to_wire(request)]))
    back = serial.request_from_wire(rows[0]).mm_features[0]
    sent = prepared.mm_features[0]
    assert (back.placeholder, back.identifier, back.modality) == (sent.placeholder, sent.identifier, "image")
    assert torch.equal(back.data["pixel_values"], sent.data["pixel_values"])


def test_scheduler_runs_each_encoder_once_and_frees_it_after_its_run():
    """Scheduler level: 16-token steps over two 10-token image runs, with room for one encoder output at a time."""
    from tests.scheduler_utils import make_request, make_scheduler
    from weavelm.core.multimodal import MultiModalFeature, PlaceholderRange
    from weavelm.core.outputs import ModelRunnerOutput

    sched = make_scheduler("fcfs", num_blocks=64, block_size=4, max_num_batched_tokens=16,
                           max_num_encoder_input_tokens=10, encoder_cache_size=10)
    req = make_request("a", list(range(40)), max_tokens=2)
    req.mm_features = [MultiModalFeature("image", {}, PlaceholderRange(offset, 10), f"img{offset}")
                       for offset in (10, 22)]
    assert sched.check_request(req) is None
    sched.add_request(req)
    steps = []
    for _ in range(4):
        out = sched.schedule()
        steps.append((out.num_scheduled_tokens["a"], out.scheduled_encoder_inputs, out.free_encoder_input_ids))
        sched.update_from_output(out, ModelRunnerOutput(["a"], {"a": 0}, [[]]))
    # 1: image 0 encoded, its run split at 16; 2: image 0 is still cached for this chunk, so the chunk stops
    # before image 1's run; 3: image 0 freed, image 1 encoded; 4: the prompt's end, image 1 freed after step 3
    assert steps == [(16, {"a": [0]}, []), (6, {}, []), (16, {"a": [1]}, [("a", 0)]), (2, {}, [("a", 1)])]
    big = make_request("b", list(range(40)), max_tokens=2)
    big.mm_features = [MultiModalFeature("image", {}, PlaceholderRange(0, 11), "big")]
    assert "encoder budget is 10" in sched.check_request(big)
    whole = make_scheduler("fcfs", num_blocks=64, block_size=4, max_num_batched_tokens=64,
                           enable_chunked_prefill=False, max_num_encoder_input_tokens=10, encoder_cache_size=10)
    assert "in its one prefill step" in whole.check_request(req)


def test_runner_mrope_positions_follow_the_model_across_chunks():
    """The M-RoPE hook (for Qwen2-VL-style models): prompt positions from the model, then p + delta."""
    import numpy as np

    from weavelm.core.outputs import CachedRequestsData, NewRequestData, SchedulerOutput
    from weavelm.plugins.workers.multimodal import EncoderRunner

    class FakeMRoPEModel(torch.nn.Module):
        supports_multimodal = True
        uses_mrope = True

        def get_mrope_input_positions(self, ids, features):
            grid = torch.arange(len(ids)).expand(3, -1).clone()
            grid[1:, 2:4] = torch.tensor([[2, 2], [2, 3]])  # a 1x2 "image" at positions 2..3
            return grid, -1

    runner = EncoderRunner(FakeMRoPEModel(), torch.device("cpu"), torch.float32)
    new = NewRequestData("r", [5, 6, 7, 7, 8], GREEDY, [0], 0)
    runner.update(SchedulerOutput([new], CachedRequestsData(), {"r": 3}, 3))
    first = runner.mrope_positions(["r"], np.array([0]), np.array([3]), torch.device("cpu"))
    rest = runner.mrope_positions(["r"], np.array([3]), np.array([4]), torch.device("cpu"))
    assert first.tolist() == [[0, 1, 2], [0, 1, 2], [0, 1, 2]]
    assert rest.tolist() == [[3, 4, 4, 5], [2, 4, 4, 5], [3, 4, 4, 5]]


@pytest.mark.parametrize("tower,layer,strategy", [("clip", [-3, -1], "full"), ("clip", -1, "default"),
                                                 ("siglip", -2, "full")])
def test_image_features_match_transformers_for_each_tower_and_layer_setting(tower, layer, strategy):
    """get_multimodal_embeddings == transformers' get_image_features, loading transformers' in-memory names."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, SiglipVisionConfig
    from transformers import LlavaForConditionalGeneration as HFModel

    from weavelm.plugins.models.decoder import LlamaForCausalLM
    from weavelm.plugins.models.llava import LlavaForConditionalGeneration

    vision = (CLIPVisionConfig if tower == "clip" else SiglipVisionConfig)(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
        patch_size=14)
    text = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=63, vision_feature_layer=layer,
                         vision_feature_select_strategy=strategy)
    torch.manual_seed(0)
    ref = HFModel(config).eval()
    ours = LlavaForConditionalGeneration.with_language_model(LlamaForCausalLM)(config).eval()
    loaded = ours.load_weights(ref.state_dict().items())
    assert loaded == {n for n, _ in ours.named_parameters()}
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        want = ref.model.get_image_features(pixel_values=pixels, vision_feature_layer=layer,
                                            vision_feature_select_strategy=strategy).pooler_output
        got = ours.get_multimodal_embeddings(pixel_values=pixels)
    cls = tower == "clip" and strategy == "full"
    assert [g.shape for g in got] == [w.shape for w in want] == [(4 + cls, 48)] * 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
