"""A third-party proposer built only from `weavelm.plugin` (tests/spec_hidden_proposer.py) receives the target's
hidden states through `ProposeInput`: one per emitted token, (tokens, hidden_size), each the LM head's input at the
position the token was sampled from (a greedy token is the head's argmax there), and greedy output stays identical
to decoding without speculation, in a mixed batch with chunked prefill and preemption."""

import os

import pytest

from weavelm import LLM, SamplingParams
from weavelm.core.registry import Registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [{"prompt_token_ids": [5, 6, 7, 8, 9] * 3}, {"prompt_token_ids": [(i * 37) % 500 + 3 for i in range(40)]},
           {"prompt_token_ids": [3, 4] * 6}]
MAX_TOKENS = [20, 16, 24]
ENGINE = dict(dtype="float32", device="cpu", cache={"num_blocks": 20, "block_size": 4},
              scheduler={"max_num_batched_tokens": 32, "max_num_seqs": 4})


def test_third_party_proposer_gets_hidden_states_and_keeps_greedy_output(tiny_llama):
    check_hidden_state_proposer(tiny_llama, ENGINE)


def check_hidden_state_proposer(tiny_llama: str, engine: dict) -> None:
    """Also run on CUDA (tests/gpu/test_spec_decode_gpu.py), where steps without drafts replay the decode graphs."""
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in MAX_TOKENS]
    with LLM(model=tiny_llama, **engine) as base:
        want = [o.outputs[0].token_ids for o in base.generate(PROMPTS, params)]
    registry = Registry.load()
    registry.register_module("tests.spec_hidden_proposer")
    oracle = [p["prompt_token_ids"] + w for p, w in zip(PROMPTS[:2], want[:2])]  # the third row gets bad drafts
    spec = {"name": "hidden_check", "num_speculative_tokens": 2,
            "head": os.path.join(tiny_llama, "model.safetensors"), "oracle": oracle}
    with LLM(model=tiny_llama, registry=registry, speculative=spec, **engine) as llm:
        outs = llm.generate(PROMPTS, params)
        assert [o.error for o in outs] == [None] * len(outs)
        assert [o.outputs[0].token_ids for o in outs] == want
        stats = llm.get_stats()
        assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
        sampled = SamplingParams(max_tokens=12, temperature=0.8, seed=3, ignore_eos=True)  # not greedy rows too
        assert all(o.error is None for o in llm.generate(PROMPTS, [sampled] * len(PROMPTS)))


def test_the_default_runners_batch_is_a_spec_decode_batch():
    from weavelm.plugin import SpecDecodeBatch
    from weavelm.plugins.workers.input_batch import InputBatch

    assert isinstance(InputBatch(max_num_reqs=2, max_model_len=8, max_blocks_per_req=2), SpecDecodeBatch)
    assert not isinstance(object(), SpecDecodeBatch)
