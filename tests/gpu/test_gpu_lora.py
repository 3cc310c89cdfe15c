"""On CUDA: the Triton LoRA kernels against the per-token reference at Qwen3-0.6B projection shapes (bf16 and
fp32), and the engine with mixed adapters, CUDA graphs on, against the same engine on the CPU (whose LoRA path
tests/test_lora.py checks against peft-merged transformers) and against peft-merged transformers when peft is
installed."""

import os
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from weavelm.lora.ops import group_by_slot, lora_reference  # noqa: E402
from weavelm.lora.triton_ops import lora_expand, lora_shrink  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

# Qwen3-0.6B: (in, out, parts) of fused QKV, gate/up, o, down; rank 16 per part
LAYERS = {"qkv": (1024, 4096, 3), "gate_up": (1024, 6144, 2), "o": (2048, 1024, 1), "down": (3072, 1024, 1)}


@pytest.mark.parametrize("tokens", [1, 37, 256, 2048])
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_kernels_match_reference_at_qwen3_shapes(tokens, layer, dtype):
    k, o, parts = LAYERS[layer]
    r, num_slots = 16 * parts, 4
    g = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, k, device="cuda", generator=g).to(dtype)
    a = (torch.randn(num_slots, r, k, device="cuda", generator=g) / k ** 0.5).to(dtype)
    b = (torch.randn(num_slots, o, r, device="cuda", generator=g) * 0.1).to(dtype)
    slots = torch.randint(-1, num_slots, (tokens,), device="cuda", generator=g, dtype=torch.int32)
    y0 = torch.randn(tokens, o, device="cuda", generator=g).to(dtype)
    index = group_by_slot(slots, num_slots)
    y = lora_expand(lora_shrink(x, a, index), b, y0.clone(), index)
    expected = y0.float() + lora_reference(x, slots, a, b)
    tol = dict(atol=1e-3, rtol=1e-3) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(y.float(), expected, **tol)


def test_kernels_replay_in_a_cuda_graph_with_new_slots():
    k, o, r, num_slots, t = 256, 384, 16, 3, 8
    x = torch.randn(t, k, device="cuda")
    a, b = torch.randn(num_slots, r, k, device="cuda") / 16, torch.randn(num_slots, o, r, device="cuda")
    slots = torch.full((64,), -1, dtype=torch.int32, device="cuda")
    order, counts, starts = (s.clone() for s in group_by_slot(slots, num_slots))
    y = torch.zeros(t, o, device="cuda")

    def run():
        y.zero_()
        lora_expand(lora_shrink(x, a, (order, counts, starts)), b, y, (order, counts, starts))

    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for trial in range(3):
        new = torch.randint(-1, num_slots, (t,), dtype=torch.int32, device="cuda")
        slots[:t] = new
        for buf, val in zip((order, counts, starts), group_by_slot(slots, num_slots)):
            buf.copy_(val)
        graph.replay()
        torch.testing.assert_close(y, lora_reference(x, new, a, b), atol=1e-3, rtol=1e-3)


@pytest.fixture(scope="module")
def tiny_with_adapters(tmp_path_factory):
    from gpu_lora import write_adapter

    from tests.model_fixtures import build_tiny_model, tiny_config

    root = tmp_path_factory.mktemp("gpu_lora")
    base = build_tiny_model("llama", str(root / "llama"), seed=0)
    cfg = tiny_config("llama").to_dict()
    paths = [write_adapter(str(root / f"a{i}"), cfg, seed=i, rank=r, b_std=0.3) for i, r in enumerate((4, 8, 16))]
    return base, paths


def test_engine_on_cuda_with_graphs_matches_cpu_and_peft(tiny_with_adapters):
    from weavelm import LLM, LoRARequest, SamplingParams

    base, paths = tiny_with_adapters
    prompts = [[5, 17, 33, 8, 99, 4], [7, 7, 21, 300, 11], [42, 1, 3, 9, 250, 77, 13], [100, 200, 300]]
    loras = [LoRARequest(f"a{i}", i + 1, p) for i, p in enumerate(paths)] + [None]
    params = SamplingParams(max_tokens=12, temperature=0)
    outs = {}
    with LLM(model=base, dtype="float32", device="cpu") as plain:
        base_tokens = [o.outputs[0].token_ids for o in plain.generate([{"prompt_token_ids": p} for p in prompts],
                                                                          params)]
    for device in ("cuda", "cpu"):
        with LLM(model=base, dtype="float32", device=device, lora={"max_loras": 3, "max_lora_rank": 16},
                 engine_process=False) as llm:
            if device == "cuda":
                graphs = llm.engine.client.core.executor.worker.runner.graphs
                assert graphs is not None and {with_lora for _, with_lora in graphs.graphs} == {False, True}
                # a batch on the base model alone replays the graphs captured without the LoRA kernels
                only_base = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
                assert [o.outputs[0].token_ids for o in only_base] == base_tokens
            outs[device] = [o.outputs[0].token_ids for o in llm.generate(
                [{"prompt_token_ids": p} for p in prompts], params, lora_request=loras)]
    assert outs["cuda"] == outs["cpu"]
    assert all(a != b for a, b in zip(outs["cpu"][:3], base_tokens[:3])) and outs["cpu"][3] == base_tokens[3]
    try:
        import peft  # noqa: F401
    except ImportError:
        return
    from tests.lora_fixtures import merged_greedy
    for p, lora, got in zip(prompts, loras, outs["cuda"]):
        assert got == merged_greedy(base, None if lora is None else lora.lora_path, p, 12)
