"""A seeded request's tokens do not depend on its neighbours under speculative decoding (issue 24, item 1).

Under `ngram` a step verifies drafts as soon as any row has some; a seeded row without drafts in that step must
still draw from its generator exactly as it does in a step without drafts (`cpu_sampling` on the CPU), with or
without top-k / top-p / min-p. The neighbour's repetitive prompt gets n-gram drafts from its first decode on, while
the seeded request's prompt has no repeated token, so it has no drafts in those steps."""

import pytest

from weavelm import LLM, SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEEDED = {"prompt_token_ids": [(i * 37) % 500 + 3 for i in range(12)]}  # no repeated token: no n-gram match
NEIGHBOUR = {"prompt_token_ids": [5, 6, 7, 8, 9] * 3}  # repetitive: n-gram lookup hits
ENGINE = dict(dtype="float32", device="cpu", cache={"num_blocks": 64, "block_size": 4})
FILTERS = {"plain": {}, "top_k": {"top_k": 20}, "top_p": {"top_p": 0.9}, "min_p": {"min_p": 0.05},
           "all": {"top_k": 50, "top_p": 0.95, "min_p": 0.02}}


@pytest.mark.parametrize("speculative", [None, {"name": "ngram", "num_speculative_tokens": 3,
                                                "prompt_lookup_min": 1, "prompt_lookup_max": 3}],
                         ids=["none", "ngram"])
def test_seeded_tokens_are_the_same_alone_and_next_to_a_drafted_request(tiny_llama, speculative):
    llm = LLM(model=tiny_llama, speculative=speculative, **ENGINE)
    neighbour = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for name, filters in FILTERS.items():
        seeded = SamplingParams(max_tokens=12, temperature=0.8, seed=7, ignore_eos=True, **filters)
        alone = llm.generate([SEEDED], seeded)[0].outputs[0].token_ids
        before = llm.get_stats().spec_num_draft_tokens if speculative else 0
        together = llm.generate([SEEDED, NEIGHBOUR], [seeded, neighbour])[0].outputs[0].token_ids
        assert together == alone, name
        if speculative:
            assert llm.get_stats().spec_num_draft_tokens > before, "the neighbour must get drafts"
