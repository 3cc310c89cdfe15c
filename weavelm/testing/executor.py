"""The executor contract: an engine built on your executor gives transformers' greedy tokens on the same weights
(mixed prompt lengths, and under a KV pool small enough to force preemption, which the suite checks happened);
seeded sampling is reproducible, depends on the seed, and only ever picks tokens inside the top-p nucleus of
transformers' distribution; outputs equal the in-process `uniproc` executor's; workers are reached through
`collective_rpc`; and `shutdown()` ends every worker process and may be called twice.

    from weavelm.testing.executor import ExecutorContract

    class TestMyExecutor(ExecutorContract):
        executor = "my_executor"                 # registered name, found through your installed entry point
        executor_options = {"num_workers": 1}     # its YAML options, if any

The model is the suite's tiny random Llama (`weavelm.testing.loader.reference_checkpoint`), run in float32 on the
CPU, so every comparison is exact.
"""

from __future__ import annotations

import os
import time
from functools import lru_cache
from typing import Any, ClassVar

import pytest
import torch

from weavelm.testing.loader import reference_checkpoint
from weavelm.testing.stats import StepRecorder

PROMPTS = ([1, 17, 300, 42, 5, 99, 250, 7, 3, 128, 64, 200, 11, 12], [31, 400, 8], [77, 123, 6, 19, 2, 88, 160],
           [5] * 30)
MAX_TOKENS = 8
TOP_P, TEMPERATURE = 0.9, 0.9
EXIT_TIMEOUT_S = 15.0


def _engine(executor: str, options: dict[str, Any], registry: Any = None, **overrides: Any):
    from weavelm import LLM

    return LLM(model=reference_checkpoint(), dtype="float32", device="cpu", loader="safetensors",
               attention="torch_ref", executor={"name": executor, **options}, registry=registry, **overrides)


def _tokens(llm, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": list(p)} for p in PROMPTS], params)]


@lru_cache(maxsize=1)
def _hf_model() -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(reference_checkpoint(), dtype=torch.float32).eval()


@lru_cache(maxsize=4)
def hf_greedy(max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of every prompt (the independent reference)."""
    model, out = _hf_model(), []
    with torch.no_grad():
        for p in PROMPTS:
            ids = model.generate(torch.tensor([list(p)]), max_new_tokens=max_new_tokens, do_sample=False,
                                 min_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
            out.append(ids[0, len(p):].tolist())
    return out


def outside_nucleus(prompt: list[int], tokens: list[int]) -> list[int]:
    """Positions of `tokens` that top-p sampling (TOP_P at TEMPERATURE) of transformers' next-token distribution
    could not have picked, given the prompt and the tokens before them."""
    with torch.no_grad():
        logits = _hf_model()(torch.tensor([list(prompt) + list(tokens)])).logits[0, len(prompt) - 1:-1]
    probs = torch.softmax(logits / TEMPERATURE, dim=-1)
    bad = []
    for i, tok in enumerate(tokens):
        sorted_probs, order = probs[i].sort(descending=True)
        before = torch.cumsum(sorted_probs, 0) - sorted_probs  # mass of the tokens ranked above each token
        rank = int((order == tok).nonzero())
        if before[rank] >= TOP_P + 1e-4:
            bad.append(i)
    return bad


def worker_pid(model: Any) -> int:
    """For `apply_model`: the pid of the process holding this rank's model (module-level: it crosses by pickle)."""
    return os.getpid()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ExecutorContract:
    """Subclass and set `executor` (and `executor_options`); pytest collects the `test_*` methods."""

    executor: ClassVar[str] = ""
    executor_options: ClassVar[dict[str, Any]] = {}

    @pytest.fixture(scope="class")
    @classmethod
    def engine(cls):
        llm = _engine(cls.executor, cls.executor_options, cache={"num_blocks": 64, "block_size": 4})
        yield llm
        llm.shutdown()

    def test_greedy_matches_transformers(self, engine):
        from weavelm import SamplingParams

        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        assert _tokens(engine, params) == hf_greedy(MAX_TOKENS)

    def test_seeded_sampling_is_reproducible_and_in_the_nucleus(self, engine):
        from weavelm import SamplingParams

        def sample(seed: int) -> list[list[int]]:
            return _tokens(engine, SamplingParams(max_tokens=MAX_TOKENS, temperature=TEMPERATURE, top_p=TOP_P,
                                                  seed=seed, ignore_eos=True))

        first, again, other = sample(1234), sample(1234), sample(99)
        assert first == again, "the same seed must give the same tokens"
        assert first != other, "a different seed must change some token"
        for prompt, tokens in zip(PROMPTS, first + other):
            assert outside_nucleus(list(prompt), tokens) == [], "a token outside the top-p nucleus was sampled"

    def test_seeded_sampling_matches_uniproc(self, engine):
        from weavelm import SamplingParams

        if self.executor == "uniproc":
            pytest.skip("uniproc is the reference; its sampling is checked against transformers above")
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=TEMPERATURE, top_p=TOP_P, seed=1234,
                                ignore_eos=True)
        with _engine("uniproc", {}, cache={"num_blocks": 64, "block_size": 4}) as reference:
            assert _tokens(engine, params) == _tokens(reference, params)

    def test_preemption_under_a_small_pool_matches_transformers(self):
        from weavelm import SamplingParams

        recorder = StepRecorder()
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        small = {"num_blocks": 16, "block_size": 4, "enable_prefix_caching": False}
        with _engine(self.executor, self.executor_options, registry=recorder.registry(), cache=small) as llm:
            got = _tokens(llm, params)
        assert recorder.num_preempted > 0, "the pool must force preemption"
        assert got == hf_greedy(12)

    def test_collective_rpc_and_model_info(self, engine):
        infos = engine.collective_rpc("model_info")
        assert infos and all(isinstance(i, dict) for i in infos)
        assert infos[0]["vocab_size"] == 512 and infos[0]["attention"] == "torch_ref"
        assert engine.collective_rpc("model_info", ranks=[0]) == infos[:1]

    def test_shutdown_ends_workers_and_is_idempotent(self):
        """Built as the engine builds it (the assembler), so `Executor.shutdown` itself is called twice."""
        from weavelm.core.assembly import Assembly
        from weavelm.core.config import EngineConfig
        from weavelm.core.registry import Registry

        config = EngineConfig.build({"model": reference_checkpoint(), "dtype": "float32", "device": "cpu",
                                     "loader": "safetensors", "attention": "torch_ref",
                                     "executor": {"name": self.executor, **self.executor_options},
                                     "cache": {"num_blocks": 32, "block_size": 4}})
        executor = Assembly(config, Registry.load()).build_executor()
        pids = executor.collective_rpc("apply_model", (worker_pid,))
        assert len(pids) >= 1
        executor.shutdown()
        executor.shutdown()
        workers = [p for p in pids if p != os.getpid()]
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in workers if _alive(p)], f"worker processes {workers} outlived shutdown()"
