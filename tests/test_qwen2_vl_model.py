"""Qwen2-VL's and Qwen2.5-VL's pieces against transformers on the same tiny random weights (fp32, CPU): the vision
tower, the M-RoPE positions (`get_rope_index`), and the whole model's logits over a paged KV cache (batched,
chunked, decode)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.qwen2_vl_fixtures import hf_processor, image, image_prompt, session_model
from weavelm.plugins.models.mrope_positions import MRopePositions, VisionPlacement, mrope_positions

BLOCK = 8
# fp32 on the CPU; the two sides differ in summation order only (matmul vs Conv3d, paged vs dense attention).
# Tower outputs are O(1), logits O(10) (initializer_range 0.3).
ATOL = RTOL = 1e-4
LOGITS_ATOL = 3e-4


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def path(tmp_path_factory, kind) -> str:
    return session_model(tmp_path_factory, kind)


@pytest.fixture(scope="module")
def hf(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(path, kind):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from weavelm.plugins.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
    from weavelm.plugins.models.qwen2_vl import Qwen2VLForConditionalGeneration

    model_class = Qwen2VLForConditionalGeneration if kind == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    model = model_class(AutoConfig.from_pretrained(path)).eval()
    weights = load_file(f"{path}/model.safetensors")
    loaded = model.load_weights(weights.items())
    assert loaded == {n for n, _ in model.named_parameters()}
    return model


@pytest.fixture(scope="module")
def processed(path, kind):
    """Two image prompts (one image of 4x6 patches; two images of 8x4 and 4x4) and a text-only prompt, processed
    one by one (no padding)."""
    proc = hf_processor(path, kind)
    cases = [(image_prompt(1, "Describe this picture."), [image(0, 56, 84)]),
             (image_prompt(2, "Which is brighter?"), [image(1, 100, 70), image(2, 60, 60)]),
             ("A text prompt without pictures", None)]
    return [proc(text=[text], images=images, return_tensors="pt") for text, images in cases]


def test_loads_the_original_checkpoint_layout(path, kind, ours):
    """Qwen's own checkpoints name the tensors `visual.*`, `model.*` and `lm_head.*` (transformers 5 saves
    `model.visual.*`, `model.language_model.*`): both fill every parameter with the same values."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    renamed = {}
    for name, tensor in load_file(f"{path}/model.safetensors").items():
        for new, old in (("model.visual.", "visual."), ("model.language_model.", "model.")):
            if name.startswith(new):
                name = old + name[len(new):]
                break
        renamed[name] = tensor
    assert any(n.startswith("visual.") for n in renamed) and any(n.startswith("model.layers.") for n in renamed)
    fresh = type(ours)(AutoConfig.from_pretrained(path))
    assert fresh.load_weights(renamed.items()) == {n for n, _ in fresh.named_parameters()}
    for (name, a), (_, b) in zip(fresh.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), name


def test_vision_tower_matches_transformers(hf, ours, processed):
    for p in processed[:2]:
        with torch.no_grad():
            ref = hf.model.visual(p["pixel_values"], grid_thw=p["image_grid_thw"]).pooler_output
            got = ours.visual(p["pixel_values"], p["image_grid_thw"].tolist())
        assert got.shape == ref.shape == (p["input_ids"].eq(hf.config.image_token_id).sum(), 64)
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)
    # a video of two temporal patches (each frame attends within itself) beside an image, from raw patch rows
    grids = [[2, 4, 6], [1, 4, 4]]
    pixels = torch.randn(2 * 4 * 6 + 16, 1176, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf.model.visual(pixels, grid_thw=torch.tensor(grids)).pooler_output
        got = ours.visual(pixels, grids)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


def test_encoder_inputs_split_per_image_and_batch_back(hf, ours, processed):
    """The frontend's per-image split (`split_mm_inputs`) batched again by the runner gives each image's rows of
    transformers' tower output."""
    from weavelm.core.multimodal import batch_mm_kwargs

    p = processed[1]
    items = ours.split_mm_inputs(p, "image", 2)
    assert [tuple(i["pixel_values"].shape) for i in items] == [(32, 1176), (16, 1176)]
    with torch.no_grad():
        got = ours.get_multimodal_embeddings(**batch_mm_kwargs(items[::-1], torch.device("cpu"), torch.float32))
        ref = hf.model.visual(p["pixel_values"], grid_thw=p["image_grid_thw"]).pooler_output
    assert [g.shape[0] for g in got] == [4, 8]
    torch.testing.assert_close(torch.cat(got[::-1]), ref, atol=ATOL, rtol=RTOL)
    from weavelm.errors import MultiModalInputError

    with pytest.raises(MultiModalInputError, match="48 patch rows and 2 grids for 3 items"):
        ours.split_mm_inputs(p, "image", 3)


def test_processor_without_torchvision_matches_transformers(tmp_path_factory):
    """`load_hf_processor` (transformers' class where it loads; here, without torchvision, the same image path from
    the saved parts) gives the tensors transformers' processor gives (the same for both kinds: one image
    processor)."""
    from weavelm.plugins.models.qwen2_vl import Qwen2VLForConditionalGeneration

    path = session_model(tmp_path_factory)
    ours, ref = Qwen2VLForConditionalGeneration.load_hf_processor(path), hf_processor(path)
    for text, images in [(image_prompt(2, "Hi there"), [image(1, 100, 70), image(2, 60, 60)]), ("plain", None)]:
        got, want = ours(text=text, images=images, return_tensors="pt"), ref(text=[text], images=images,
                                                                              return_tensors="pt")
        assert sorted(got.keys()) == sorted(want.keys())
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_mrotary_rows_and_config_errors():
    from transformers import Qwen2VLTextConfig

    from weavelm.errors import ConfigError
    from weavelm.layers.rotary import MRotaryEmbedding

    cfg = Qwen2VLTextConfig(hidden_size=64, num_attention_heads=4,
                            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4})
    rope = MRotaryEmbedding(cfg, 16, 64)
    q, k = torch.randn(5, 4, 16), torch.randn(5, 2, 16)
    flat = torch.tensor([0, 3, 9, 20, 62])
    for a, b in zip(rope(flat.expand(3, -1), q, k), rope(flat, q, k)):  # equal rows: the plain rotary
        torch.testing.assert_close(a, b)
    rows = torch.stack([flat, flat + 1, flat * 0])
    moved = rope(rows, q, k)[0]
    assert torch.equal(moved[..., :2], rope(flat, q, k)[0][..., :2])  # run 0 (2 frequencies) follows row 0
    assert not torch.allclose(moved[..., 2:8], rope(flat, q, k)[0][..., 2:8])
    cfg.rope_parameters["mrope_section"] = [2, 3, 4]
    with pytest.raises(ConfigError, match=r"mrope_section: must be three positive integers summing to half the "
                                          r"rotary dimension \(8\) \(got \[2, 3, 4\]\)"):
        MRotaryEmbedding(cfg, 16, 64)


def test_positions_match_get_rope_index(hf, ours, processed):
    for p in processed:
        ids = p["input_ids"][0].tolist()
        grids = p["image_grid_thw"].tolist() if "image_grid_thw" in p else []
        got = ours.mrope_positions(ids, grids)
        if grids:
            ref, delta = hf.model.get_rope_index(p["input_ids"], p["mm_token_type_ids"], p["image_grid_thw"])
            assert got.delta == int(delta) and got.delta != 0
            np.testing.assert_array_equal(got.prompt, ref[:, 0].numpy())
        else:
            assert got.delta == 0
            np.testing.assert_array_equal(got.prompt, np.tile(np.arange(len(ids)), (3, 1)))
        tail = got.rows(np.arange(len(ids) - 2, len(ids) + 3))  # the prompt's end, then generated tokens
        np.testing.assert_array_equal(tail[:, :2], got.prompt[:, -2:])
        np.testing.assert_array_equal(tail[:, 2:], np.tile(np.arange(len(ids), len(ids) + 3) + got.delta, (3, 1)))


def test_positions_interleave_images_and_videos(hf, ours, kind):
    """image, video (2 frames), image, with text between: the same rows as transformers for mixed token types
    (Qwen2.5-VL: the video's frames 1.5 s apart)."""
    img, vid, m = hf.config.image_token_id, hf.config.video_token_id, 2
    grids = {"i0": (1, 4, 6), "v": (2, 4, 4), "i1": (1, 2, 4)}
    layout = [5, 6, ("i0", img), 7, ("v", vid), 8, 9, ("i1", img), 10]
    ids, types = [], []
    for piece in layout:
        if isinstance(piece, tuple):
            t, h, w = grids[piece[0]]
            n = t * h * w // m ** 2
            ids += [piece[1]] * n
            types += [1 if piece[1] == img else 2] * n
        else:
            ids.append(piece)
            types.append(0)
    seconds = {} if kind == "qwen2_vl" else {"second_per_grid_ts": torch.tensor([1.5])}
    ref, delta = hf.model.get_rope_index(torch.tensor([ids]), torch.tensor([types]),
                                         torch.tensor([grids["i0"], grids["i1"]]), torch.tensor([grids["v"]]),
                                         **seconds)
    got = ours.mrope_positions(ids, [grids["i0"], grids["i1"]], [grids["v"]],
                               **{k: v.tolist() for k, v in seconds.items()})
    np.testing.assert_array_equal(got.prompt, ref[:, 0].numpy())
    assert got.delta == int(delta)
    if kind == "qwen2_5_vl":  # frames 2 * 1.5 = 3 positions apart
        assert sorted(set(got.prompt[0][np.array(ids) == vid])) == [6, 9]


def test_positions_reject_mismatched_placeholders():
    with pytest.raises(ValueError, match="needs 6 consecutive placeholder tokens 9 at index 1"):
        mrope_positions([1, 9, 9, 9, 2], [VisionPlacement(9, (1, 4, 6))], 2)
    with pytest.raises(ValueError, match="more placeholder tokens than its 1 image"):
        mrope_positions([1, 9, 9, 2, 9], [VisionPlacement(9, (1, 2, 4))], 2)
    with pytest.raises(ValueError, match="no placeholder run left"):
        mrope_positions([1, 2, 3], [VisionPlacement(9, (1, 2, 2))], 2)


class PagedModel:
    """Our model over a paged KV cache with the reference attention backend: feed each request's next tokens (as
    embeddings) with their M-RoPE positions, get every fed token's logits."""

    def __init__(self, model, num_reqs: int, max_len: int = 64):
        from weavelm.core.registry import Registry

        backend_cls = Registry.load().get("attention", "torch_ref")
        backend = backend_cls(backend_cls.Options())
        layers, heads, kv_heads, head = model.attention_layout()
        blocks = -(-max_len // BLOCK)
        self.model, self.builder = model, backend.make_builder(torch.device("cpu"))
        self.kv = [torch.zeros(backend.kv_cache_shape(num_reqs * blocks, BLOCK, kv_heads, head))
                   for _ in range(layers)]
        self.impls = [backend.make_impl(heads, kv_heads, head, head ** -0.5) for _ in range(layers)]
        self.table = torch.arange(num_reqs * blocks, dtype=torch.int32).view(num_reqs, blocks)
        self.computed = [0] * num_reqs

    def step(self, embeds: list[torch.Tensor], positions: list[np.ndarray]) -> torch.Tensor:
        from weavelm.core.forward import CommonAttentionMetadata, ForwardBatch

        lens = [e.shape[0] for e in embeds]
        index = torch.cat([torch.arange(c, c + n) for c, n in zip(self.computed, lens)])
        rows = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])
        slots = self.table[rows, index // BLOCK].long() * BLOCK + index % BLOCK
        start = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
        self.computed = [c + n for c, n in zip(self.computed, lens)]
        seq_lens = torch.tensor(self.computed, dtype=torch.int32)
        common = CommonAttentionMetadata(
            query_start_loc=start, seq_lens=seq_lens, block_table=self.table, slot_mapping=slots,
            query_start_loc_cpu=start, seq_lens_cpu=seq_lens, num_reqs=len(lens), num_actual_tokens=sum(lens),
            max_query_len=max(lens), max_seq_len=max(self.computed), block_size=BLOCK)
        batch = ForwardBatch(self.builder.build(common), self.kv, self.impls)
        with torch.no_grad():
            hidden = self.model(None, torch.from_numpy(np.concatenate(positions, axis=1)), batch, torch.cat(embeds))
            return self.model.compute_logits(hidden)


def _prompt_embeds(model, p) -> tuple[torch.Tensor, MRopePositions]:
    ids = p["input_ids"][0]
    with torch.no_grad():
        x = model.get_input_embeddings(ids)
        if "pixel_values" in p:
            grids = p["image_grid_thw"].tolist()
            images = torch.cat(model.embed_images(p["pixel_values"], grids))
            x[ids == model.image_token_id] = images
    return x, model.mrope_positions(ids.tolist(), p["image_grid_thw"].tolist() if "pixel_values" in p else [])


def test_logits_match_transformers_batched_chunked_and_decode(hf, ours, processed):
    """The three prompts in one batch, prefilled in two chunks (the first image's placeholder run spans them), then
    one decode step each; every token's logits against transformers' full forward."""
    embeds, positions = zip(*(_prompt_embeds(ours, p) for p in processed))
    paged = PagedModel(ours, len(processed))
    cut = [5, 9, 4]  # inside each prompt's first placeholder run (indices 1..6 / 1..8) and in the text
    first = paged.step([e[:c] for e, c in zip(embeds, cut)], [pos.prompt[:, :c] for pos, c in zip(positions, cut)])
    second = paged.step([e[c:] for e, c in zip(embeds, cut)], [pos.prompt[:, c:] for pos, c in zip(positions, cut)])
    nexts = [7, 123, 4567]
    with torch.no_grad():
        decode = paged.step([ours.get_input_embeddings(torch.tensor([t])) for t in nexts],
                            [pos.rows(np.array([e.shape[0]])) for pos, e in zip(positions, embeds)])
    offsets = np.cumsum([0] + cut), np.cumsum([0] + [e.shape[0] - c for e, c in zip(embeds, cut)])
    for i, (p, c, t) in enumerate(zip(processed, cut, nexts)):
        ids = torch.cat([p["input_ids"], torch.tensor([[t]])], dim=1)
        kw = {k: p[k] for k in ("pixel_values", "image_grid_thw") if k in p}
        types = torch.cat([p["mm_token_type_ids"], torch.zeros(1, 1, dtype=p["mm_token_type_ids"].dtype)], dim=1)
        with torch.no_grad():
            ref = hf(input_ids=ids, mm_token_type_ids=types, **kw).logits[0]
        got = torch.cat([first[offsets[0][i]:offsets[0][i + 1]], second[offsets[1][i]:offsets[1][i + 1]],
                         decode[i:i + 1]])
        torch.testing.assert_close(got, ref, atol=LOGITS_ATOL, rtol=RTOL)
    assert (first.abs().max() > 1).item()  # logits of a size where the tolerance means something
