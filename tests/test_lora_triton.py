"""The Triton LoRA kernels (lora/triton_ops.py, Punica-style shrink/expand grouped by adapter slot) against the
per-token-gather reference (lora/ops.py), on CPU in triton's interpreter (TRITON_INTERPRET=1, set for this module
only, as tests/test_triton_ops.py does), and the engine end to end with its LoRA layers routed through them."""

from __future__ import annotations

import pytest
import torch

from tests.test_triton_ops import ON_GPU  # noqa: F401  (imports triton under the interpreter, or skips)
from weavelm.lora.ops import group_by_slot, lora_grouped_torch, lora_reference

DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture(scope="module")
def kernels():
    import importlib
    import os

    old = os.environ.get("TRITON_INTERPRET")
    if not ON_GPU:
        os.environ["TRITON_INTERPRET"] = "1"
    mod = importlib.import_module("weavelm.lora.triton_ops")
    if not ON_GPU and type(mod._shrink_kernel).__name__ != "InterpretedFunction":
        mod = importlib.reload(mod)
    yield mod
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


# (tokens, in, rank per part x parts, out, slots): decode-sized, prefill-sized with a ragged tail, one slot, and a
# decode-sized one whose K (600) is split across programs
SHAPES = [(5, 48, 8, 40, 3), (70, 64, 48, 96, 4), (17, 33, 4, 130, 1), (9, 600, 16, 24, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_shrink_expand_match_the_per_token_reference(kernels, shape, dtype):
    t, k, r, o, num_slots = shape
    g = torch.Generator().manual_seed(t)
    x = torch.randn(t, k, generator=g).to(DEVICE, dtype)
    a = (torch.randn(num_slots, r, k, generator=g) / k ** 0.5).to(DEVICE, dtype)
    b = torch.randn(num_slots, o, r, generator=g).to(DEVICE, dtype)
    slots = torch.randint(-1, num_slots, (t,), generator=g, dtype=torch.int32).to(DEVICE)
    slots[0] = -1
    y0 = torch.randn(t, o, generator=g).to(DEVICE, dtype)
    index = group_by_slot(slots, num_slots)
    y = kernels.lora_expand(kernels.lora_shrink(x, a, index), b, y0.clone(), index)
    expected = y0.float() + lora_reference(x, slots, a, b)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y.float(), expected, **tol)
    torch.testing.assert_close(y[0], y0[0])  # a base-model token is untouched
    groups = [(s, (slots == s).nonzero().flatten().cpu()) for s in range(num_slots)]
    grouped = lora_grouped_torch(x.cpu().float(), y0.cpu().float(), groups, a.cpu().float(), b.cpu().float())
    torch.testing.assert_close(grouped, expected.cpu(), atol=1e-4, rtol=1e-4)


def test_grouping_reads_only_static_buffers(kernels):
    """The index is (sorted positions, counts, starts) of fixed shapes: tokens with slot -1 are in no group."""
    slots = torch.tensor([2, -1, 0, 2, -1, 0, 0], dtype=torch.int32, device=DEVICE)
    order, counts, starts = group_by_slot(slots, 3)
    assert counts.tolist() == [3, 0, 2] and starts.tolist() == [0, 3, 3]
    assert order[:5].tolist() == [2, 5, 6, 0, 3]


def test_engine_with_triton_lora_layers_matches_merged_transformers(kernels, tiny_llama, tmp_path, monkeypatch,
                                                                    one_torch_thread):
    """The whole engine on CPU with its LoRA layers (projections, embedding, head) run by the interpreted kernels."""
    pytest.importorskip("peft")
    from tests.lora_fixtures import ADAPTERS, build_adapter, merged_greedy
    from weavelm import LLM, LoRARequest, SamplingParams
    from weavelm.lora import batch

    if not ON_GPU:
        monkeypatch.setattr(batch, "use_triton", lambda x: True)
    path = build_adapter(tiny_llama, str(tmp_path / "mix16"), *ADAPTERS["mix16"], seed=2)
    prompts = [[5, 17, 33, 8, 99, 4], [7, 7, 21, 300, 11]]
    with LLM(model=tiny_llama, dtype="float32", device="cpu", lora={"max_loras": 2, "max_lora_rank": 16}) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=4, temperature=0),
                            lora_request=[LoRARequest("mix16", 1, path), None])
    assert outs[0].outputs[0].token_ids == merged_greedy(tiny_llama, path, prompts[0], 4)
    assert outs[0].outputs[0].token_ids != merged_greedy(tiny_llama, None, prompts[0], 4)
    assert outs[1].outputs[0].token_ids == merged_greedy(tiny_llama, None, prompts[1], 4)
