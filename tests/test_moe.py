"""Mixture-of-experts: `weavelm.layers.FusedMoE` and the Mixtral / Qwen2-MoE / Qwen3-MoE architectures built on it.

- The three expert implementations agree: the grouped-GEMM Triton kernel (run in triton's interpreter without CUDA)
  and the sorted CPU path against the readable reference; expert weights shard over two ranks and sum back to one.
- Each architecture passes the model-architecture contract (`weavelm.testing.model.ModelContract`, fp32 CPU, tiny
  random checkpoints saved by transformers): transformers' greedy tokens and logits, TP=2 over gloo, LoRA on the
  attention and dense layers against peft's merge; plus the same tokens in mixed batches under chunked prefill,
  prefix caching and forced preemption. An adapter of the experts is refused with a LoRAError naming the module.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch
from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from weavelm import LLM, LoRARequest, SamplingParams
from weavelm.core.hookspecs import hookimpl
from weavelm.core.registry import Registry
from weavelm.distributed import TensorParallelGroup
from weavelm.layers.fused_moe import FusedExperts, moe_reference, moe_sorted, select_experts
from weavelm.testing.attention import triton_interpreter_without_cuda
from weavelm.testing.model import ENGINE, ModelContract, _hf_model

ON_GPU = torch.cuda.is_available()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _routing(t: int, e: int, k: int, renormalize: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return select_experts(torch.randn(t, e, generator=g), k, renormalize)


def _weights(e: int, h: int, i: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, generator=g) for t in ((9, h), (e, 2 * i, h), (e, h, i)))


# -- the expert implementations -------------------------------------------------------------------------------
def test_select_experts_normalisation():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    w, ids = select_experts(logits, 2, renormalize=False)
    probs = torch.softmax(logits, -1)
    assert ids.tolist() == [[0, 1]] and torch.allclose(w, probs[:, :2])
    w, _ = select_experts(logits, 2, renormalize=True)
    assert torch.allclose(w, probs[:, :2] / probs[:, :2].sum())


@pytest.mark.parametrize("num_experts", [6, 64], ids=["per-expert", "grouped"])
def test_sorted_cpu_path_equals_reference(num_experts):
    """Few experts hit: one matmul per expert; many (over GROUPED_MM_MIN_EXPERTS): grouped matmuls."""
    x, w13, w2 = _weights(num_experts, 32, 24)
    weights, ids = _routing(9, num_experts, 6, renormalize=False)
    torch.testing.assert_close(moe_sorted(x, w13, w2, weights, ids), moe_reference(x, w13, w2, weights, ids),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 3e-2)])
def test_triton_grouped_gemm_matches_reference(dtype, tol):
    """Both block sizes (decode: 16, prefill: 64), an expert with no tokens, non-power-of-two dims."""
    device = "cuda" if ON_GPU else "cpu"
    x, w13, w2 = (t.to(device) * s for t, s in zip(_weights(5, 48, 40), (1.0, 0.2, 0.2)))
    weights, ids = _routing(9, 5, 2)
    ids, weights = ids.clamp(max=3).to(device), weights.to(device)  # expert 4 gets nothing
    x, w13, w2 = x.to(dtype), w13.to(dtype), w2.to(dtype)
    want = moe_reference(x.double(), w13.double(), w2.double(), weights.double(), ids).float()
    with triton_interpreter_without_cuda(reload=("weavelm.layers.triton_ops", "weavelm.layers.moe_kernels")):
        from weavelm.layers import moe_kernels

        for block_m in (16, 64):
            got = moe_kernels.fused_moe(x, w13, w2, weights, ids, block_m=block_m)
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), want, atol=tol * want.abs().max().item(), rtol=tol)


def test_align_block_size_groups_pairs_by_expert():
    from weavelm.layers.moe_kernels import moe_align_block_size

    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])
    sorted_ids, expert_ids, num_padded = moe_align_block_size(ids, 4, 4)
    n = ids.numel()
    assert num_padded.item() == 12  # experts 0, 1, 2 hold 2, 1, 3 pairs: one block of 4 each
    assert sorted_ids[:12].tolist() == [1, 4, n, n, 3, n, n, n, 0, 2, 5, n]  # flat pairs t * 2 + j
    assert expert_ids[:3].tolist() == [0, 1, 2]


def test_experts_shard_over_two_ranks():
    """Each rank's weight_loader takes its slice of every expert (per-expert and fused checkpoint tensors); the
    ranks' partial outputs sum to the single-rank output."""
    e, h, i = 4, 16, 8
    x, w13, w2 = _weights(e, h, i)
    weights, ids = _routing(9, e, 2)
    full = FusedExperts(e, h, i, TensorParallelGroup())
    full.weight_loader(full.w13_weight, w13)
    full.weight_loader(full.w2_weight, w2)
    want = full(x, weights, ids)
    total = torch.zeros_like(want)
    for rank in range(2):
        part = FusedExperts(e, h, i, TensorParallelGroup(rank, 2))
        for ex in range(e):  # per-expert tensors, as Mixtral / Qwen-MoE checkpoints store them
            part.weight_loader(part.w13_weight, w13[ex, :i], (ex, "gate"))
            part.weight_loader(part.w13_weight, w13[ex, i:], (ex, "up"))
            part.weight_loader(part.w2_weight, w2[ex], (ex, "down"))
        assert part.w13_weight.shape == (e, i, h) and part.w2_weight.shape == (e, h, i // 2)
        total += part(x, weights, ids)
    torch.testing.assert_close(total, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="experts 0..3"):
        full.weight_loader(full.w13_weight, w13[0, :i], (4, "gate"))


def test_load_moe_checkpoint_routes_expert_tensors():
    """Per-expert checkpoint names (Mixtral's w1/w3/w2, Qwen's gate/up/down_proj) and transformers' fused
    `experts.gate_up_proj` / `experts.down_proj` fill the same stacked weights; the set reports them once complete."""
    from torch import nn

    from weavelm.layers import FusedMoE, WeightsMapper, load_moe_checkpoint

    e, h, i = 3, 8, 4
    _, w13, w2 = _weights(e, h, i)
    router = torch.randn(e, h)
    per_expert = [("model.moe.gate.weight", router)]
    for ex in range(e):
        per_expert += [(f"model.moe.experts.{ex}.w1.weight", w13[ex, :i]), (f"model.moe.experts.{ex}.w3.weight",
                       w13[ex, i:]), (f"model.moe.experts.{ex}.down_proj.weight", w2[ex])]
    fused = [("model.moe.gate.weight", router), ("model.moe.experts.gate_up_proj", w13),
             ("model.moe.experts.down_proj", w2)]
    names = {"moe.gate.weight", "moe.experts.w13_weight", "moe.experts.w2_weight"}
    for weights in (per_expert, fused):
        model = nn.Module()
        model.moe = FusedMoE(h, i, e, 2, renormalize=True)
        assert load_moe_checkpoint(model, weights, mapper=WeightsMapper({"model.": ""}), stacked={}) == names
        assert torch.equal(model.moe.experts.w13_weight, w13) and torch.equal(model.moe.experts.w2_weight, w2)
    assert load_moe_checkpoint(model, per_expert[:4], mapper=WeightsMapper({"model.": ""}), stacked={}) == \
        {"moe.gate.weight"}  # expert 0's parts only: the stacked weights are not complete
    with pytest.raises(ValueError, match="model.moe.experts.3.w1.weight.*experts 0..2"):
        load_moe_checkpoint(model, [("model.moe.experts.3.w1.weight", w13[0, :i])],
                            mapper=WeightsMapper({"model.": ""}), stacked={})


# -- the architectures -------------------------------------------------------------------------------------
class StepObserver:
    def __init__(self):
        self.stats = []

    @hookimpl
    def weavelm_step_finished(self, stats):
        self.stats.append(stats)


def _sched_prompts() -> list[list[int]]:
    rng = random.Random(5)
    shared = [rng.randrange(3, 250) for _ in range(8)]
    prompts = [[rng.randrange(3, 250) for _ in range(n)] for n in (5, 17, 3)]
    return prompts + [shared + prompts[0][:4], shared + prompts[2][:3]]  # two share two full blocks


SCHED_PROMPTS = _sched_prompts()
SCHED_TOKENS = 10


class _MoeContract(ModelContract):
    """The contract, plus mixed batches under chunked prefill, prefix caching and preemption."""

    speculative_check: bool = False

    def test_scheduling_keeps_greedy_tokens(self, checkpoint):
        model = _hf_model(checkpoint)
        want = []
        with torch.no_grad():
            for p in SCHED_PROMPTS:
                ids = model.generate(torch.tensor([p]), max_new_tokens=SCHED_TOKENS, min_new_tokens=SCHED_TOKENS,
                                     do_sample=False, eos_token_id=None, pad_token_id=0)
                want.append(ids[0, len(p):].tolist())
        observer = StepObserver()
        registry = Registry.load()
        registry.pm.register(observer)
        params = SamplingParams(max_tokens=SCHED_TOKENS, temperature=0, ignore_eos=True)
        with LLM(model=checkpoint, registry=registry, **ENGINE,
                 cache={"block_size": 4, "num_blocks": 9, "enable_prefix_caching": True},
                 scheduler={"max_num_seqs": 4, "max_num_batched_tokens": 10, "long_prefill_token_threshold": 7}) as llm:
            outs = llm.generate([{"prompt_token_ids": p} for p in SCHED_PROMPTS], params)
            hit_rate = llm.get_stats().prefix_cache_hit_rate
        assert [o.outputs[0].token_ids for o in outs] == want
        assert sum(s.num_preempted for s in observer.stats) > 0, "the KV budget did not force a preemption"
        assert max(s.num_scheduled_tokens for s in observer.stats) <= 10
        assert any(s.num_running > 1 for s in observer.stats), "no step mixed requests"
        assert hit_rate > 0

    def test_ngram_speculation_keeps_greedy_tokens(self, checkpoint, reference):
        if not self.speculative_check:
            pytest.skip("speculation is model-independent; checked on Mixtral only")
        super().test_ngram_speculation_keeps_greedy_tokens(checkpoint, reference)


class TestMixtral(_MoeContract):
    config_class = MixtralConfig
    config_kwargs = {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32}
    lora_target_modules = ["q_proj", "v_proj", "o_proj"]
    speculative_check = True

    def test_adapter_of_the_experts_is_refused(self, checkpoint, adapter, tmp_path):
        """A (pre-v5 transformers) adapter that also adapts experts' w1: a LoRAError naming the expert module."""
        from safetensors.torch import load_file, save_file

        path = str(tmp_path / "experts")
        shutil.copytree(adapter, path)
        tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
        stem = "base_model.model.model.layers.0.block_sparse_moe.experts.1.w1"
        tensors[f"{stem}.lora_A.weight"] = torch.zeros(self.lora_rank, 64)
        tensors[f"{stem}.lora_B.weight"] = torch.zeros(32, self.lora_rank)
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
        with open(os.path.join(path, "adapter_config.json")) as f:
            cfg = json.load(f)
        for targets, needle in ((list(cfg["target_modules"]) + ["w1"], "'w1'"),
                                (list(cfg["target_modules"]), "layers.0.block_sparse_moe.experts.1.w1")):
            cfg["target_modules"] = targets
            with open(os.path.join(path, "adapter_config.json"), "w") as f:
                json.dump(cfg, f)
            with LLM(model=checkpoint, lora={"max_loras": 1, "max_lora_rank": self.lora_rank}, **ENGINE) as llm:
                out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=2),
                                   lora_request=LoRARequest("experts", 1, path))[0]
            assert out.outputs[0].finish_reason == "error", out.outputs[0].token_ids
            assert needle in out.error and "mixture-of-experts" in out.error, out.error


class TestQwen2Moe(_MoeContract):
    config_class = Qwen2MoeConfig
    config_kwargs = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                     "shared_expert_intermediate_size": 48, "mlp_only_layers": [1]}  # layer 1 is dense
    lora_target_modules = ["q_proj", "k_proj", "gate_proj", "up_proj", "down_proj"]  # shared expert + dense MLP


class TestQwen3Moe(_MoeContract):
    config_class = Qwen3MoeConfig
    config_kwargs = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                     "norm_topk_prob": True, "head_dim": 16}
    lora_target_modules = ["q_proj", "o_proj"]
