"""On CUDA over NCCL: pipeline parallelism (and TP x PP where there are 4 GPUs) gives the one-GPU engine's greedy
tokens on a mixed batch (fp32 so that micro-batch shapes cannot flip a token), with CUDA graphs off on pipeline
stages and the engine core's batch queue keeping one step per stage in flight."""

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from weavelm import LLM, SamplingParams  # noqa: E402

PROMPTS = [list(range(3, 3 + n)) for n in (5, 40, 300, 17, 1)]
PARAMS = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_and_reference(tmp_path_factory):
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=64, vocab_size=32000, tie_word_embeddings=True,
                      max_position_embeddings=2048, initializer_range=0.05)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("qwen3_pp"))
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    with LLM(model=path, dtype="float32", device="cuda", executor="uniproc") as llm:
        want = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS)]
    return path, want


@pytest.mark.parametrize("tp,pp,backend", [(1, 2, "mp"), (2, 2, "mp"), (1, 2, "ray")])
def test_pipeline_parallel_matches_one_gpu(model_and_reference, tp, pp, backend):
    if torch.cuda.device_count() < tp * pp:
        pytest.skip(f"needs {tp * pp} GPUs")
    if backend == "ray":
        pytest.importorskip("ray")
    path, want = model_and_reference
    with LLM(model=path, dtype="float32", device="cuda", tensor_parallel_size=tp, pipeline_parallel_size=pp,
             distributed_executor_backend=backend, scheduler={"max_num_batched_tokens": 64}) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS)]
    assert got == want
