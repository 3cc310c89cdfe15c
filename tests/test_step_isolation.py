"""EngineCore's failure rule, with fault-injecting runners registered only in these tests: a step that raises
finishes the requests scheduled in it with an error, frees their blocks, and the engine keeps serving."""

from __future__ import annotations

import pytest

from weavelm import LLM, SamplingParams
from weavelm.core.registry import Registry
from weavelm.errors import RequestError
from weavelm.plugins.workers.model_runner import PagedModelRunner

POISON = 13  # a prompt starting with this token makes the faulty runner raise
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


class PoisonedPromptError(RuntimeError):
    pass


class FaultyRunner(PagedModelRunner):
    """Raises while launching any step that holds a request whose prompt starts with POISON."""

    name = "faulty"
    always = False

    def execute_model_async(self, scheduler_output):
        poisoned = any(r.prompt_token_ids[:1] == [POISON] for r in scheduler_output.scheduled_new_reqs)
        poisoned = poisoned or any(self.requests[r].prompt_token_ids[:1] == [POISON]
                                   for r in scheduler_output.scheduled_cached_reqs.req_ids if r in self.requests)
        if poisoned or FaultyRunner.always:
            super().execute_model_async(scheduler_output)  # the batch state is updated, then the step "fails"
            raise PoisonedPromptError("injected fault")
        return super().execute_model_async(scheduler_output)


@pytest.fixture
def engine(tiny_llama):
    registry = Registry.load()
    registry.add("model_runner", FaultyRunner.name, FaultyRunner)
    llm = LLM(model=tiny_llama, dtype="float32", device="cpu", loader="safetensors", registry=registry,
              model_runner="faulty", cache={"num_blocks": 64, "block_size": 4})
    yield llm
    FaultyRunner.always = False


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_poisoned_step_fails_its_requests_and_the_engine_goes_on(engine):
    good = [[5, 6, 7, 8], [21, 22]]
    solo = tokens(engine.generate(good, GREEDY))
    outs = engine.generate([[POISON, 1, 2]], GREEDY)
    assert outs[0].error and "PoisonedPromptError: injected fault" in outs[0].error
    assert outs[0].outputs[0].finish_reason == "error"
    assert engine.get_stats().num_used_blocks == 0
    assert tokens(engine.generate(good, GREEDY)) == solo  # the next call is served normally


def test_mixed_call_errors_only_the_failed_step_and_frees_everything(engine):
    good = [[5, 6, 7, 8], [21, 22], [30, 31, 32]]
    solo = {tuple(p): t for p, t in zip(good, tokens(engine.generate(good, GREEDY)))}
    outs = engine.generate(good + [[POISON, 9]], GREEDY)
    poisoned = outs[-1]
    assert poisoned.error and poisoned.outputs[0].finish_reason == "error"
    for prompt, out in zip(good, outs):
        # a good request either shared the failed step (and says so) or ran to its solo output
        assert out.error is not None or out.outputs[0].token_ids == solo[tuple(prompt)]
        if out.error is not None:
            assert "injected fault" in out.error
    assert engine.get_stats().num_used_blocks == 0 and engine.get_stats().num_running_reqs == 0
    assert tokens(engine.generate(good, GREEDY)) == list(solo.values())


def test_a_cause_that_keeps_failing_is_not_retried_forever(engine):
    FaultyRunner.always = True
    outs = engine.generate([[1, 2, 3], [4, 5], [6]], GREEDY)
    assert all(o.error for o in outs)
    assert engine.get_stats().num_used_blocks == 0
    FaultyRunner.always = False
    assert all(o.error is None for o in engine.generate([[1, 2, 3]], GREEDY))


def test_a_request_longer_than_the_pool_is_rejected_at_add(tiny_llama):
    """max_model_len is capped to what the pool holds (4 blocks x 4 tokens), so a prompt that could never fit is
    refused before it is queued, and a long generation stops at the cap with finish_reason "length"."""
    llm = LLM(model=tiny_llama, dtype="float32", device="cpu", loader="safetensors",
              cache={"num_blocks": 4, "block_size": 4})
    outs = llm.generate([list(range(1, 21)), [1, 2, 3]], SamplingParams(max_tokens=40, ignore_eos=True))
    assert outs[0].error and "max_model_len is 16" in outs[0].error
    assert outs[1].error is None and outs[1].outputs[0].finish_reason == "length"
    assert len(outs[1].outputs[0].token_ids) == 16 - 3
    with pytest.raises(RequestError, match="max_model_len"):
        llm.engine.add_request(list(range(1, 21)), SamplingParams(max_tokens=4))
    assert llm.get_stats().num_waiting_reqs == 0 and llm.get_stats().num_used_blocks == 0


def test_a_prompt_above_the_budget_without_chunking_is_rejected_at_add(tiny_llama):
    llm = LLM(model=tiny_llama, dtype="float32", device="cpu", loader="safetensors",
              scheduler={"name": "fcfs", "max_num_batched_tokens": 8, "enable_chunked_prefill": False})
    with pytest.raises(RequestError, match="chunked prefill is off"):
        llm.engine.add_request(list(range(1, 12)), SamplingParams(max_tokens=4))
    assert llm.get_stats().num_waiting_reqs == 0
    assert llm.generate([list(range(1, 8))], SamplingParams(max_tokens=2))[0].error is None
