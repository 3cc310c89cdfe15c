"""DP attention + EP MoE: `data_parallel_size=2, enable_expert_parallel=True` on a tiny Qwen3-MoE (4 experts,
top-2, fp32, CPU). The two replicas' workers form one gloo world, each holds 2 whole experts, and every MoE layer
dispatches tokens over the expert-parallel group spanning them, so the replicas step in lockstep (a replica with no
request runs dummy MoE forwards).

One engine serves the module: a request alone (the other replica idle throughout), then a mixed batch under a small
KV budget (preemption) whose requests end at different steps (one replica idles while the other finishes) give
transformers' greedy tokens; then a killed replica ends the engine (its experts are gone) with a ReplicaDeadError
naming it for every in-flight request, within 10 s, and no process left behind.
"""

from __future__ import annotations

import operator
import os
import random
import signal
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from tests.dp_utils import alive, slow_steps, wait_gone
from weavelm import LLM, SamplingParams
from weavelm.errors import ReplicaDeadError
from weavelm.testing.model import TINY

ENGINE = dict(dtype="float32", device="cpu", loader="safetensors", num_threads=1, data_parallel_size=2,
              enable_expert_parallel=True, cache={"block_size": 4, "num_blocks": 9},
              scheduler={"max_num_seqs": 3, "max_num_batched_tokens": 12, "long_prefill_token_threshold": 8})


def _prompts() -> list[list[int]]:
    rng = random.Random(11)
    return [[rng.randrange(3, 250) for _ in range(n)] for n in (5, 13, 3, 9, 7, 4)]


PROMPTS = _prompts()
MAX_TOKENS = [8, 3, 12, 5, 10, 2]  # requests end at different steps: replicas fall idle at different times


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("qwen3_moe_dp_ep"))
    torch.manual_seed(0)
    config = Qwen3MoeConfig(**{**TINY, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                               "norm_topk_prob": True, "head_dim": 16})
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def references(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p, n in zip(PROMPTS, MAX_TOKENS):
            ids = model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            out.append(ids[0, len(p):].tolist())
    return out


@pytest.fixture(scope="module")
def llm(checkpoint):
    with LLM(checkpoint, **ENGINE) as llm:
        pids = llm.engine.client.replica_pids
        yield llm
    assert wait_gone(pids) == [], "a replica process outlived its engine"


def params(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_each_replica_holds_half_the_experts(llm):
    shapes = llm.collective_rpc("apply_model", (operator.attrgetter("layers.0.mlp.experts.w13_weight.shape"),))
    assert [tuple(s) for s in shapes] == [(2, 64, 64)] * 2  # replica order: 2 of 4 experts (2 x 32) each


def test_greedy_tokens_match_transformers_with_an_idle_replica_and_preemption(llm, references):
    before = llm.get_stats().replicas
    alone = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params(MAX_TOKENS[0]), use_tqdm=False)
    assert alone[0].outputs[0].token_ids == references[0]  # the other replica ran dummy forwards only
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], [params(n) for n in MAX_TOKENS],
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == references
    after = llm.get_stats().replicas
    served = [a.num_requests - b.num_requests for a, b in zip(after, before)]
    assert sum(served) == len(PROMPTS) + 1 and min(served) >= 2, served
    assert sum(r.num_preemptions for r in after) > 0, "9 KV blocks per replica did not force a preemption"


def test_a_dead_replica_ends_every_replica_naming_it(llm):
    engine, client = llm.engine, llm.engine.client
    llm.collective_rpc("set_logits_hook", (slow_steps,))
    ids = [engine.add_request({"prompt_token_ids": p}, params(20), request_id=f"slow-{i}")
           for i, p in enumerate(PROMPTS[:4])]
    started = set()
    while len(started) < len(ids):
        started |= {out.request_id for out in engine.step()}
    pids = client.replica_pids
    os.kill(pids[1], signal.SIGKILL)
    killed = time.monotonic()
    finals = {}
    while len(finals) < len(ids):
        finals.update((o.request_id, o) for o in engine.step() if o.finished)
    assert time.monotonic() - killed < 10
    for out in finals.values():
        assert out.outputs[0].finish_reason == "error"
        assert out.error.startswith("ReplicaDeadError: data-parallel replica 1 is dead"), out.error
        assert "share the experts" in out.error
    with pytest.raises(ReplicaDeadError, match="data-parallel replica 1") as e:
        client.check_health()
    assert e.value.replica == 1
    assert wait_gone(pids) == [] and not any(alive(p) for p in pids)


def test_cli_flags_set_both(checkpoint):
    from weavelm.cli import build_parser, engine_config_from_args

    args = build_parser().parse_args(["generate", "--model", checkpoint, "--device", "cpu",
                                      "--data-parallel-size", "2", "--enable-expert-parallel"])
    config = engine_config_from_args(args)
    assert config.data_parallel_size == 2 and config.executor.options.enable_expert_parallel is True
    assert config.executor.name == "uniproc"
