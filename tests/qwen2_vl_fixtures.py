"""A tiny random Qwen2-VL saved by transformers with its processor's parts (a `Qwen2VLImageProcessor` and the SmolLM2
tokenizer plus Qwen2-VL's vision special tokens), and small images made from numpy arrays.

transformers cannot build a `Qwen2VLProcessor` without torchvision (its video processor's base class is missing:
the constructor's class check fails even for `video_processor=None`), and these machines have no torchvision.
`hf_processor(path)` builds the real class with that one check skipped, for the reference side of tests: the image
processor and the placeholder expansion are transformers' own code.
"""

from __future__ import annotations

import os

import numpy as np
import torch

SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# images are resized to multiples of 28 (patch 14 x merge 2) with at most this many pixels: <= 30 merged tokens
MAX_PIXELS = 28 * 28 * 30


VISION = {  # Qwen2-VL; Qwen2.5-VL (windows of 2x2 merged patches, block 1 of 3 attending over the whole frame)
    "qwen2_vl": dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
    "qwen2_5_vl": dict(depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2,
                       window_size=56, fullatt_block_indexes=[1], tokens_per_second=2),
}


def tiny_config(tok, kind: str = "qwen2_vl"):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    ids = tok.convert_tokens_to_ids(SPECIAL)
    config_class = Qwen2VLConfig if kind == "qwen2_vl" else Qwen2_5_VLConfig
    return config_class(
        vision_config=dict(patch_size=14, temporal_patch_size=2, spatial_merge_size=2, initializer_range=0.3,
                           **VISION[kind]),
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rms_norm_eps=1e-6, initializer_range=0.3, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}),
        vision_start_token_id=ids[0], vision_end_token_id=ids[1], image_token_id=ids[2], video_token_id=ids[3],
        tie_word_embeddings=False)


def build_tiny_qwen2_vl(path: str, seed: int = 0, kind: str = "qwen2_vl") -> str:
    """Save a seeded random Qwen2-VL (`kind` "qwen2_vl") or Qwen2.5-VL ("qwen2_5_vl") and its processor's parts to
    `path` (once) and return it."""
    from transformers import (AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor)

    from weavelm.default_model import default_model_path

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    tok = AutoTokenizer.from_pretrained(default_model_path())
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=MAX_PIXELS, patch_size=14,
                                            temporal_patch_size=2, merge_size=2)
    image_processor.save_pretrained(path)
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    model_class = Qwen2VLForConditionalGeneration if kind == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    model = model_class(tiny_config(tok, kind)).to(torch.float32)
    model.save_pretrained(path)
    return path


def session_model(tmp_path_factory, kind: str = "qwen2_vl") -> str:
    """The test session's tiny model of `kind` (seed 0), built once and shared by every module that asks."""
    return build_tiny_qwen2_vl(str(tmp_path_factory.getbasetemp() / f"tiny_{kind}"), kind=kind)


def hf_processor(path: str, kind: str = "qwen2_vl"):
    """transformers' `Qwen2VLProcessor` (or `Qwen2_5_VLProcessor`) over the saved image processor and tokenizer
    (see the module docstring)."""
    from unittest import mock

    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    processor_class = Qwen2VLProcessor if kind == "qwen2_vl" else Qwen2_5_VLProcessor
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None):
        return processor_class(image_processor=AutoImageProcessor.from_pretrained(path),
                                tokenizer=AutoTokenizer.from_pretrained(path))


def image(seed: int, height: int, width: int):
    """A random RGB picture of `height x width` pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def image_prompt(num_images: int, text: str) -> str:
    """A prompt with `num_images` image slots (the processor expands each `<|image_pad|>` to its grid's run)."""
    return "".join("<|vision_start|><|image_pad|><|vision_end|>" for _ in range(num_images)) + text
