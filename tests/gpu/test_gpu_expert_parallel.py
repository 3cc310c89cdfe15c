"""On 2 CUDA devices: expert parallelism (tensor_parallel_size=2, enable_expert_parallel=True, NCCL) on a tiny
Qwen3-MoE in fp32 gives the greedy tokens of one GPU, with and without CUDA graphs (the Triton grouped GEMM skips
the other rank's experts); and the dispatch paths (all-to-all, all-gather + reduce-scatter) over NCCL, run inside
the engine's ranks, equal one whole layer."""

import functools

import pytest
import torch

pytestmark = pytest.mark.gpu
if torch.cuda.device_count() < 2:
    pytest.skip("needs 2 CUDA devices", allow_module_level=True)

from weavelm import LLM, SamplingParams  # noqa: E402
from weavelm.testing.expert_parallel import rank_dispatch_errors  # noqa: E402

PROMPTS = [[5, 17, 33, 8, 99, 4], [7, 7, 21, 100, 11], [42, 1, 3, 9, 25, 77, 13, 42, 1, 3]]


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, vocab_size=1024, num_experts=8, num_experts_per_tok=2,
                         moe_intermediate_size=128, norm_topk_prob=True, max_position_embeddings=1024,
                         initializer_range=0.2, tie_word_embeddings=False)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("qwen3_moe_ep"))
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    return path


def _tokens(llm: LLM) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("eager", [True, False])
def test_expert_parallel_on_two_gpus_matches_one(qwen3_moe, eager):
    with LLM(model=qwen3_moe, dtype="float32", device="cuda", enforce_eager=eager) as one:
        want = _tokens(one)
    with LLM(model=qwen3_moe, dtype="float32", device="cuda", enforce_eager=eager, tensor_parallel_size=2,
             enable_expert_parallel=True) as llm:
        assert _tokens(llm) == want
        if eager:
            check = functools.partial(rank_dispatch_errors, tokens=(5, 0))
            for errors in llm.collective_rpc("apply_model", (check,)):
                assert all(err < 1e-4 for err in errors.values()), errors
