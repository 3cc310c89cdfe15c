"""On CUDA with CUDA graphs on: speculative decoding keeps greedy output token-identical (tiny fixtures, fp32,
mixed batch with chunked prefill, prefix caching and preemption). Steps that verify drafts have k + 1 query tokens
per request, which the decode graphs do not take: they run eagerly (`DecodeGraphs.can_run`), while steps without
drafts still replay the graphs."""

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from tests.model_fixtures import ARCHS  # noqa: E402
from weavelm import LLM, SamplingParams  # noqa: E402

PROMPTS = [{"prompt_token_ids": [5, 6, 7, 8, 9] * 3}, {"prompt_token_ids": [(i * 37) % 500 + 3 for i in range(60)]},
           {"prompt_token_ids": list(range(100, 132)) + [20, 21]}, {"prompt_token_ids": list(range(100, 132)) + [30]},
           {"prompt_token_ids": [3, 4] * 6}]
MAX_TOKENS = [24, 30, 17, 9, 28]
ENGINE = dict(dtype="float32", device="cuda", cache={"num_blocks": 10, "block_size": 16},
              scheduler={"max_num_batched_tokens": 32, "max_num_seqs": 8})


def _run(model: str, speculative: dict | None):
    llm = LLM(model=model, speculative=speculative, **ENGINE)
    outs = llm.generate(PROMPTS, [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in MAX_TOKENS])
    core = llm.engine.client.core
    graphs = core.executor.worker.runner.graphs is not None
    result = [o.outputs[0].token_ids for o in outs], llm.get_stats(), core.scheduler.num_preemptions, graphs
    llm.shutdown()
    return result


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_identity_on_cuda(tiny_models, arch):
    target = tiny_models[arch]
    ref, _, preempted, graphs = _run(target, None)
    assert preempted > 0
    for spec in ({"name": "ngram", "num_speculative_tokens": 4},
                 {"name": "draft_model", "num_speculative_tokens": 3, "model": target}):
        got, stats, preempted, spec_graphs = _run(target, spec)
        assert got == ref, spec["name"]
        assert spec_graphs == graphs  # graphs are still captured (and replayed for steps without drafts)
        assert stats.spec_num_draft_tokens > 0 and preempted > 0
        if spec["name"] == "draft_model":  # the target as its own draft: GPU kernels for 1 and k + 1 query tokens
            assert stats.spec_acceptance_rate > 0.95  # may round differently, so allow a rare near-tie rejection


def test_third_party_proposer_gets_hidden_states_on_cuda(tiny_llama):
    """The decode graphs return the hidden states too: a proposer that drafts from them gets the right ones."""
    from tests.test_spec_hidden_states import check_hidden_state_proposer

    check_hidden_state_proposer(tiny_llama, dict(ENGINE, cache={"num_blocks": 64, "block_size": 16}))
