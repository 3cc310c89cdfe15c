"""On CUDA: the engine's logits track transformers' on the same weights under teacher forcing, for every attention
backend that can run, with and without CUDA graphs (Qwen3-0.6B shape, random weights, bf16)."""

import gc

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from weavelm import LLM  # noqa: E402
from weavelm.testing import teacher_forced_logits  # noqa: E402

TOL = 2e-2


@pytest.fixture(scope="module")
def qwen3_06b(tmp_path_factory):
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                      rope_theta=1e6, max_position_embeddings=4096, initializer_range=0.02)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    path = str(tmp_path_factory.mktemp("qwen3_06b"))
    model.save_pretrained(path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 151936, (n,), generator=g).tolist() for n in (37, 300, 5, 1100)]
    conts = [torch.randint(0, 151936, (12,), generator=g).tolist() for _ in prompts]
    refs = []
    with torch.no_grad():
        for p, c in zip(prompts, conts):
            logits = model(torch.tensor([p + c], device="cuda")).logits[0].float()
            refs.append(logits[len(p) - 1:len(p) - 1 + len(c)].cpu())
    del model
    torch.cuda.empty_cache()
    return path, prompts, conts, refs


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
@pytest.mark.parametrize("backend", ["torch_ref", "triton", "flash_attn"])
def test_teacher_forced_logits_track_transformers(qwen3_06b, backend, eager):
    from weavelm.core.forward import AttentionSpec
    from weavelm.core.registry import Registry

    reasons = Registry.load().get("attention", backend).check(
        AttentionSpec("cuda", torch.bfloat16, 128, 16, 8, 16))
    if reasons:
        pytest.skip("; ".join(reasons))
    path, prompts, conts, refs = qwen3_06b
    llm = LLM(model=path, dtype="bfloat16", device="cuda", loader="safetensors", attention=backend,
              enforce_eager=eager, cache={"num_blocks": 1024}, scheduler={"max_num_seqs": 8},
              model_runner={"cuda_graph_max_bs": 8})
    runner = llm.engine.client.core.executor.worker.runner
    assert (runner.graphs is not None) == (not eager and runner.attn_backend.graph_safe)
    try:
        got = teacher_forced_logits(llm, prompts, conts)
        for i, (g, r) in enumerate(zip(got, refs)):
            rel = ((g - r).norm(dim=-1) / r.norm(dim=-1))
            assert rel.max().item() <= TOL, f"request {i}: per-step relative error {rel.tolist()}"
    finally:
        llm.shutdown()
        del llm, runner
        gc.collect()
        torch.cuda.empty_cache()
