"""A tiny random LLaVA (CLIP vision tower + Llama text model) saved by transformers with its LlavaProcessor
(CLIPImageProcessor + SmolLM2's real tokenizer with an added `<image>` token), and images made from numpy."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

IMAGE_SIZE, PATCH = 56, 14
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # "default" strategy: the CLS feature is dropped


def build_tiny_llava(path: str, tokenizer_dir: str, seed: int = 0) -> str:
    """Save a seeded random LLaVA and its processor to `path` (once) and return it; `tokenizer_dir` holds SmolLM2's
    tokenizer (the `smol_tokenizer_model` fixture's folder)."""
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       initializer_range=0.3, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         image_seq_length=IMAGE_TOKENS, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", initializer_range=0.3)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    with torch.no_grad():  # a random vision tower's features are tiny next to 0.3-scale text embeddings
        for p in model.model.multi_modal_projector.parameters():
            p.mul_(8.0)
    model.save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=PATCH,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1)
    processor.save_pretrained(path)
    return path


def make_image(seed: int, size: tuple[int, int] = (64, 48)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def data_url(image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class HFLlava:
    """transformers' LlavaForConditionalGeneration and LlavaProcessor on the same folder: the reference."""

    def __init__(self, path: str):
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(path)
        self.model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()

    def greedy(self, prompt: str, images: list | None, max_new_tokens: int) -> list[int]:
        inputs = self.processor(text=prompt, images=images or None, return_tensors="pt")
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="session")
def tiny_llava(smol_tokenizer_model, tmp_path_factory) -> str:
    """The tiny LLaVA folder, built once per session (import this fixture into a test module to use it)."""
    return build_tiny_llava(str(tmp_path_factory.mktemp("tiny_llava")), smol_tokenizer_model)


@pytest.fixture(scope="session")
def llava_registry():
    """A registry with the `llava` model plugin (its entry point is visible once the package is reinstalled)."""
    from weavelm.core.registry import Registry, RegistrySpec

    return Registry.from_spec(RegistrySpec(modules=("weavelm.plugins.models.llava",)))
