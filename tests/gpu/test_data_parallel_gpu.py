"""On CUDA: `data_parallel_size=2` puts each replica on its own GPU (CUDA_VISIBLE_DEVICES narrowed per replica) and
gives the one-GPU engine's greedy tokens; DP attention + EP MoE (`enable_expert_parallel`) on a small Qwen3-MoE over
NCCL gives the one-GPU engine's tokens too, with one replica idle for a while (fp32)."""

import os

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
if torch.cuda.device_count() < 2:
    pytest.skip("needs 2 GPUs", allow_module_level=True)

from weavelm import LLM, SamplingParams  # noqa: E402

PROMPTS = [list(range(3, 3 + n)) for n in (5, 40, 300, 17, 1, 64)]
PARAMS = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def visible_devices(model) -> str | None:
    """What CUDA_VISIBLE_DEVICES the replica's worker sees (an `apply_model` function, pickled by reference)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def _save(cfg, path: str) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    return path


def _generate(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS)]


def test_two_replicas_on_two_gpus_match_one_gpu(tmp_path):
    from transformers import Qwen3Config

    path = _save(Qwen3Config(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=4, head_dim=64, vocab_size=32000, max_position_embeddings=2048,
                             initializer_range=0.05), str(tmp_path / "qwen3"))
    with LLM(model=path, dtype="float32", device="cuda") as llm:
        want = _generate(llm)
    with LLM(model=path, dtype="float32", device="cuda", data_parallel_size=2) as llm:
        assert sorted(llm.collective_rpc("apply_model", (visible_devices,))) == \
            sorted(os.environ.get("CUDA_VISIBLE_DEVICES", "0,1").split(",")[:2])
        assert _generate(llm) == want
        assert all(r.num_requests > 0 for r in llm.get_stats().replicas)


def test_dp_attention_ep_moe_matches_one_gpu(tmp_path):
    from transformers import Qwen3MoeConfig

    path = _save(Qwen3MoeConfig(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_experts=8,
                                num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=4,
                                num_attention_heads=8, num_key_value_heads=4, head_dim=32, vocab_size=32000,
                                max_position_embeddings=2048, initializer_range=0.05), str(tmp_path / "moe"))
    with LLM(model=path, dtype="float32", device="cuda") as llm:
        want = _generate(llm)
    with LLM(model=path, dtype="float32", device="cuda", data_parallel_size=2, enable_expert_parallel=True) as llm:
        alone = llm.generate([{"prompt_token_ids": PROMPTS[0]}], PARAMS)  # the other replica idles (dummy steps)
        assert alone[0].outputs[0].token_ids == want[0]
        assert _generate(llm) == want
