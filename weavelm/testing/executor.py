"""The executor contract: an engine built on your executor gives exactly the outputs of the in-process `uniproc`
executor (greedy and seeded sampling, mixed prompt lengths, preemption under a small KV pool), reaches its workers
through `collective_rpc`, reports the model's facts, and shuts down idempotently.

    from weavelm.testing.executor import ExecutorContract

    class TestMyExecutor(ExecutorContract):
        executor = "my_executor"                 # registered name, found through your installed entry point
        executor_options = {"num_workers": 1}     # its YAML options, if any

The model is the suite's tiny random Llama (`weavelm.testing.loader.reference_checkpoint`), run in float32 on the
CPU, so the comparison is exact.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from weavelm.testing.loader import reference_checkpoint

PROMPTS = ([1, 17, 300, 42, 5, 99, 250, 7, 3, 128, 64, 200, 11, 12], [31, 400, 8], [77, 123, 6, 19, 2, 88, 160],
           [5] * 30)


def _engine(executor: str, options: dict[str, Any], **overrides: Any):
    from weavelm import LLM

    return LLM(model=reference_checkpoint(), dtype="float32", device="cpu", loader="safetensors",
               attention="torch_ref", executor={"name": executor, **options}, **overrides)


def _tokens(llm, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": list(p)} for p in PROMPTS], params)]


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

    @pytest.fixture(scope="class")
    @classmethod
    def reference(cls):
        llm = _engine("uniproc", {}, cache={"num_blocks": 64, "block_size": 4})
        yield llm
        llm.shutdown()

    def test_greedy_matches_uniproc(self, engine, reference):
        from weavelm import SamplingParams

        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        assert _tokens(engine, params) == _tokens(reference, params)

    def test_seeded_sampling_matches_uniproc(self, engine, reference):
        from weavelm import SamplingParams

        params = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True)
        assert _tokens(engine, params) == _tokens(reference, params)

    def test_preemption_under_a_small_pool_matches_uniproc(self):
        from weavelm import SamplingParams

        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        small = {"num_blocks": 16, "block_size": 4, "enable_prefix_caching": False}
        with _engine(self.executor, self.executor_options, cache=small) as llm:
            got = _tokens(llm, params)
        with _engine("uniproc", {}, cache=small) as llm:
            assert got == _tokens(llm, params)

    def test_collective_rpc_and_model_info(self, engine):
        infos = engine.collective_rpc("model_info")
        assert infos and all(isinstance(i, dict) for i in infos)
        assert infos[0]["vocab_size"] == 512 and infos[0]["attention"] == "torch_ref"
        assert engine.collective_rpc("model_info", ranks=[0]) == infos[:1]

    def test_shutdown_is_idempotent(self):
        llm = _engine(self.executor, self.executor_options, cache={"num_blocks": 32, "block_size": 4})
        llm.shutdown()
        llm.shutdown()
