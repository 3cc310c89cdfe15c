"""Expert parallelism (`enable_expert_parallel`): each rank holds whole experts, tokens meet them.

- The expert kernels skip pairs marked as another rank's (`moe_sorted`, `moe_reference`, the Triton grouped GEMM
  under triton's interpreter); a rank's loader copies only its experts and never reads the others'; uneven
  experts are a ConfigError.
- `LLM(tensor_parallel_size=2, enable_expert_parallel=True)` on a tiny Qwen3-MoE (4 experts, top-2, fp32): each
  rank holds 2 experts, and a mixed batch under chunked prefill and forced preemption gives transformers' greedy
  tokens; in the same two gloo ranks, the three combine paths (replicated tokens + all-reduce, all-to-all dispatch,
  all-gather + reduce-scatter) on ranks holding different token counts (one rank none) equal one whole FusedMoE.
  Killing rank 1 mid-generation is an EngineDeadError naming it within 10 s, and no worker survives.
- The CLI flag `--enable-expert-parallel` sets the same option.
"""

from __future__ import annotations

import argparse
import functools
import operator
import os
import random
import signal
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from weavelm import LLM, SamplingParams
from weavelm.core.hookspecs import hookimpl
from weavelm.core.model_files import LazyTensor
from weavelm.core.registry import Registry
from weavelm.distributed import ParallelContext, ParallelLayout, TensorParallelGroup
from weavelm.errors import ConfigError, EngineDeadError
from weavelm.layers.expert_parallel import ExpertParallel, to_local
from weavelm.layers.fused_moe import FusedExperts, FusedMoE, moe_reference, moe_sorted, select_experts
from weavelm.testing.attention import triton_interpreter_without_cuda
from weavelm.testing.expert_parallel import rank_dispatch_errors
from weavelm.testing.model import ENGINE, TINY

E, H, I, K = 4, 16, 8, 2


def _routing(t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return select_experts(torch.randn(t, E, generator=g), K, True)


def _weights(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)


# -- kernels, loading, errors ---------------------------------------------------------------------------------
def test_marked_pairs_are_skipped_by_every_expert_path():
    """Rank 1 of 2 holds experts 2, 3: its partial equals the reference over all experts with experts 0, 1 zeroed."""
    x = torch.randn(7, H)
    weights, ids = _routing(7)
    w13, w2 = _weights()
    first, n = 2, 2
    local = to_local(ids, first, n)
    assert ((local == n) == (ids < first)).all() and torch.equal(local[ids >= first], ids[ids >= first] - first)
    zeroed13, zeroed2 = w13.clone(), w2.clone()
    zeroed13[:first] = 0
    want = moe_reference(x, zeroed13, zeroed2, weights, ids)
    for fn in (moe_reference, moe_sorted):
        torch.testing.assert_close(fn(x, w13[first:], w2[first:], weights, local), want)
    with triton_interpreter_without_cuda(reload=("weavelm.layers.triton_ops", "weavelm.layers.moe_kernels")):
        from weavelm.layers import moe_kernels
        got = moe_kernels.fused_moe(x, w13[first:].contiguous(), w2[first:].contiguous(), weights, local,
                                    block_m=16, skip_marked=True)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _unread(t: torch.Tensor) -> LazyTensor:
    def read(dim, start, length):
        raise AssertionError("another rank's expert was read")
    return LazyTensor(tuple(t.shape), t.dtype, read)


def test_a_rank_loads_only_its_experts():
    w13, w2 = _weights()
    ep = ExpertParallel(TensorParallelGroup(1, 2, (0, 1)))
    experts = FusedExperts(E, H, I, TensorParallelGroup(1, 2), ep)
    assert experts.w13_weight.shape == (2, 2 * I, H) and experts.w2_weight.shape == (2, H, I)
    for e in range(E):
        mine = e >= 2
        gate, up, down = w13[e, :I], w13[e, I:], w2[e]
        for part, t in (("gate", gate), ("up", up)):
            experts.weight_loader(experts.w13_weight, t if mine else _unread(t), (e, part))
        experts.weight_loader(experts.w2_weight, down if mine else _unread(down), (e, "down"))
    assert torch.equal(experts.w13_weight, w13[2:]) and torch.equal(experts.w2_weight, w2[2:])
    assert experts.expected_shards(experts.w2_weight) == {(2, "down"), (3, "down")}
    fused = FusedExperts(E, H, I, TensorParallelGroup(1, 2), ep)  # transformers' stacked tensors: a dim-0 slice
    fused.weight_loader(fused.w13_weight, w13, None)
    fused.weight_loader(fused.w2_weight, w2, None)
    assert torch.equal(fused.w13_weight, w13[2:]) and torch.equal(fused.w2_weight, w2[2:])


def test_uneven_experts_and_dense_models_are_config_errors():
    ep = ExpertParallel.from_context(ParallelContext.for_rank(ParallelLayout(tensor=3, expert=True), 0))
    with pytest.raises(ConfigError, match="4 experts do not divide evenly over 3 expert-parallel ranks"):
        FusedMoE(H, I, E, K, True, ep=ep)
    assert ExpertParallel.from_context(ParallelContext.for_rank(ParallelLayout(tensor=2), 0)) is None
    from weavelm.core.model_size import build_model
    from weavelm.plugins.models.qwen3 import Qwen3ForCausalLM
    with pytest.raises(ConfigError, match="no mixture-of-experts layers"):
        build_model(Qwen3ForCausalLM, None, TensorParallelGroup(0, 2),
                    parallel=ParallelContext.for_rank(ParallelLayout(tensor=2, expert=True), 0))


# -- the combine paths on two gloo ranks ---------------------------------------------------------------------
# -- the engine ----------------------------------------------------------------------------------------------
class StepObserver:
    def __init__(self):
        self.stats = []

    @hookimpl
    def weavelm_step_finished(self, stats):
        self.stats.append(stats)


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(3, 250) for _ in range(n)] for n in (5, 17, 3, 11)]


PROMPTS, MAX_TOKENS = _prompts(), 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("qwen3_moe_ep"))
    torch.manual_seed(0)
    config = Qwen3MoeConfig(**{**TINY, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                               "norm_topk_prob": True, "head_dim": 16})
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


def hf_greedy(path: str) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = model.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
            out.append(ids[0, len(p):].tolist())
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _kill_rank_mid_generation(llm: LLM, pid: int) -> None:
    caught: dict[str, BaseException] = {}

    def run() -> None:
        try:
            llm.generate([{"prompt_token_ids": [1, 2, 3]}] * 4, SamplingParams(max_tokens=30, ignore_eos=True))
        except BaseException as e:  # noqa: BLE001 - inspected below
            caught["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - started < 10, "no error within 10 s of the kill"
    assert isinstance(caught.get("error"), EngineDeadError), caught
    assert f"worker rank 1 (pid {pid})" in str(caught["error"])


def test_tp2_expert_parallel_matches_transformers_with_preemption(checkpoint):
    want = hf_greedy(checkpoint)
    observer = StepObserver()
    registry = Registry.load()
    registry.pm.register(observer)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    with LLM(model=checkpoint, registry=registry, tensor_parallel_size=2, enable_expert_parallel=True, **ENGINE,
             cache={"block_size": 4, "num_blocks": 9},
             scheduler={"max_num_seqs": 4, "max_num_batched_tokens": 10, "long_prefill_token_threshold": 7}) as llm:
        shapes = llm.collective_rpc("apply_model", (operator.attrgetter("layers.0.mlp.experts.w13_weight.shape"),))
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
        # the dispatch paths (for ranks with different tokens: DP attention + EP), in the engine's gloo ranks
        dispatch = llm.collective_rpc("apply_model", (functools.partial(rank_dispatch_errors, tokens=(5, 0)),))
        pids = llm.collective_rpc("pid")
        _kill_rank_mid_generation(llm, pids[1])  # a dead expert rank: typed, named, within 10 s
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "a worker process survived shutdown"
    assert [tuple(s) for s in shapes] == [(2, 64, 64)] * 2  # 2 whole experts (2 x 32 intermediate) per rank
    assert [o.outputs[0].token_ids for o in outs] == want
    assert sum(s.num_preempted for s in observer.stats) > 0, "the KV budget did not force a preemption"
    assert any(s.num_running > 1 for s in observer.stats), "no step mixed requests"
    for rank, errors in enumerate(dispatch):  # rank 1 holds no tokens: it still joins every collective
        assert sorted(errors) == ["all2all", "allgather", "replicated"]
        assert all(err < 1e-5 for err in errors.values()), (rank, errors)


def test_cli_flag_sets_the_executor_option(checkpoint):
    from weavelm.cli import add_engine_args, engine_config_from_args

    p = argparse.ArgumentParser()
    add_engine_args(p)
    args = p.parse_args(["--model", checkpoint, "--tensor-parallel-size", "2", "--enable-expert-parallel",
                         "--device", "cpu"])
    config = engine_config_from_args(args)
    assert config.executor.name == "multiproc"
    assert config.executor.options.enable_expert_parallel is True
    assert config.executor.options.tensor_parallel_size == 2

