"""On CUDA: async scheduling (on by default there) gives the same greedy tokens as the synchronous engine, with
CUDA graphs, chunked prefill, prefix caching and preemption; plain-temperature batches take the one-pass sampler
and seeded requests stay reproducible whatever else is in the batch."""

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from tests.model_fixtures import build_tiny_model  # noqa: E402
from tests.test_async_scheduling import MAX_TOKENS, PROMPTS  # noqa: E402
from weavelm import LLM, SamplingParams  # noqa: E402

ENGINE = dict(dtype="float32", device="cuda", cache={"num_blocks": 26, "block_size": 4},
              scheduler={"max_num_batched_tokens": 32, "max_num_seqs": 8}, model_runner={"cuda_graph_max_bs": 8})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model("llama", str(tmp_path_factory.mktemp("gpu_async") / "llama"), seed=0)


def test_async_greedy_matches_sync_on_cuda(tiny):
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in MAX_TOKENS]
    default = LLM(model=tiny, **ENGINE)
    assert default.engine.client.core.async_scheduling  # the default on CUDA
    got = [o.outputs[0].token_ids for o in default.generate(PROMPTS, params)]
    assert default.engine.client.core.scheduler.num_preemptions > 0
    sync = LLM(model=tiny, async_scheduling=False, **ENGINE)
    want = [o.outputs[0].token_ids for o in sync.generate(PROMPTS, params)]
    assert got == want
    assert default.get_stats().num_used_blocks == 0


def test_temperature_sampling_and_seeds_on_cuda(tiny):
    llm = LLM(model=tiny, **ENGINE)
    vocab = llm.engine.vocab_size
    outs = llm.generate(PROMPTS, [SamplingParams(max_tokens=m, temperature=0.8, ignore_eos=True)
                                  for m in MAX_TOKENS])  # the one-pass sampler
    assert [len(o.outputs[0].token_ids) for o in outs] == MAX_TOKENS
    assert all(0 <= t < vocab for o in outs for t in o.outputs[0].token_ids)
    seeded = SamplingParams(max_tokens=20, temperature=0.8, seed=11, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], seeded)[0].outputs[0].token_ids
    crowd = llm.generate(PROMPTS, [seeded] + [SamplingParams(max_tokens=20, temperature=0.8, ignore_eos=True)]
                         * (len(PROMPTS) - 1))[0].outputs[0].token_ids
    assert alone == crowd
