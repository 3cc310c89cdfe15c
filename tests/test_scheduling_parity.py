"""End to end on the tiny fixtures (fp32, CPU): scheduling must never change what the model generates.

A tiny KV pool forces repeated preemption by recompute; prefill is chunked by 1, 7, 64 tokens or not at all; prefix
caching is on or off. Every output must equal transformers' greedy output token for token.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.model_fixtures import hf_greedy
from weavelm import LLM, SamplingParams
from weavelm.core.hookspecs import hookimpl
from weavelm.core.registry import Registry

BS = 4
MAX_TOKENS = 12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and they contend with other tests on small machines."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class StepObserver:
    """A `weavelm_step_finished` observer plugin recording every step's stats."""

    def __init__(self):
        self.stats = []

    @hookimpl
    def weavelm_step_finished(self, stats):
        self.stats.append(stats)


@pytest.fixture
def observer():
    obs = StepObserver()
    obs.registry = Registry.load()  # the engines of a test that observes are built on this registry
    obs.registry.pm.register(obs)
    yield obs


def _prompts() -> list[list[int]]:
    rng = random.Random(3)
    shared = [rng.randrange(3, 512) for _ in range(8)]
    lens = [5, 19, 11, 14, 3]
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in lens]
    prompts.append(shared + prompts[0][:6])  # two prompts share two full blocks
    prompts.append(shared + prompts[2][:9])
    return prompts


PROMPTS = _prompts()
PRIORITIES = [3, 0, 2, 1, 0, 2, 1]


@pytest.fixture(scope="module")
def references(tiny_llama):
    return [hf_greedy(tiny_llama, p, MAX_TOKENS) for p in PROMPTS]


def make_llm(path: str, scheduler: str, chunk: int | None, caching: bool, num_blocks: int, registry=None,
             **sched) -> LLM:
    opts = {"name": scheduler, "max_num_seqs": 4}
    if chunk is not None:
        opts.update(max_num_batched_tokens=chunk + 3, long_prefill_token_threshold=chunk)
    opts.update(sched)
    return LLM(model=path, dtype="float32", device="cpu", loader="safetensors", registry=registry,
               cache={"block_size": BS, "num_blocks": num_blocks, "enable_prefix_caching": caching},
               scheduler=opts)


def generate(llm: LLM, prompts=PROMPTS, priorities=PRIORITIES) -> list[list[int]]:
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, priority=p)
              for p in priorities]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("scheduler", ["fcfs", "priority"])
@pytest.mark.parametrize("chunk", [1, 7, 64, None], ids=["chunk1", "chunk7", "chunk64", "unlimited"])
@pytest.mark.parametrize("caching", [True, False], ids=["cache", "nocache"])
def test_parity_under_repeated_preemption(tiny_llama, references, observer, scheduler, chunk, caching):
    llm = make_llm(tiny_llama, scheduler, chunk, caching, num_blocks=9, registry=observer.registry)  # 36 tokens: one request at a time
    assert generate(llm) == references
    preemptions = sum(s.num_preempted for s in observer.stats)
    assert preemptions >= 3, f"only {preemptions} preemptions: the KV budget does not bind"
    if chunk is not None:
        assert max(s.num_scheduled_tokens for s in observer.stats) <= chunk + 3
    last = observer.stats[-1]
    assert last.num_running == 0 and last.num_waiting == 0 and last.kv_usage == 0.0
    assert (last.prefix_hit_rate > 0) == caching


def test_parity_with_a_one_token_budget(tiny_llama, references, observer):
    llm = make_llm(tiny_llama, "fcfs", None, True, num_blocks=10, registry=observer.registry,
                   max_num_batched_tokens=1)
    assert generate(llm) == references
    assert all(s.num_scheduled_tokens == 1 for s in observer.stats)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_parity_other_architectures_under_preemption(tiny_models, observer, arch):
    path = tiny_models[arch]
    refs = [hf_greedy(path, p, MAX_TOKENS) for p in PROMPTS]
    assert generate(make_llm(path, "priority", 7, True, num_blocks=9, registry=observer.registry)) == refs
    assert sum(s.num_preempted for s in observer.stats) > 0


def _run_shared_prefix(path: str, caching: bool, observer: StepObserver):
    """Through the public surface: the second request's cached tokens from its RequestOutput, the tokens the
    engine computed for it from the `weavelm_step_finished` stats."""
    llm = make_llm(path, "fcfs", None, caching, num_blocks=64, registry=observer.registry)
    rng = random.Random(11)
    prefix = [rng.randrange(3, 512) for _ in range(3 * BS)]
    first = prefix + [rng.randrange(3, 512) for _ in range(2)]
    second = prefix + [rng.randrange(3, 512) for _ in range(5)]
    out_first = generate(llm, [first], [0])[0]
    mark = len(observer.stats)
    [request_output] = llm.generate([{"prompt_token_ids": second}], SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    tokens_for_second = sum(s.num_scheduled_tokens for s in observer.stats[mark:])
    return out_first, request_output.outputs[0].token_ids, request_output.num_cached_tokens, tokens_for_second, \
        second


def test_shared_prefix_computes_only_the_uncached_suffix(tiny_llama, observer):
    first_on, second_on, hit_on, sched_on, prompt = _run_shared_prefix(tiny_llama, True, observer)
    first_off, second_off, hit_off, sched_off, _ = _run_shared_prefix(tiny_llama, False, observer)
    assert hit_on == 3 * BS and hit_off == 0
    decodes = MAX_TOKENS - 1
    assert sched_on == (len(prompt) - 3 * BS) + decodes  # only the 5-token suffix is prefilled
    assert sched_off == len(prompt) + decodes
    assert (first_on, second_on) == (first_off, second_off)
    assert second_on == hf_greedy(tiny_llama, prompt, MAX_TOKENS)
