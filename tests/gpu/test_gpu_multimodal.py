"""On CUDA: the tiny LLaVA with async scheduling and CUDA graphs (decode steps replay graphs; steps whose tokens hold
image placeholders run eagerly) gives transformers' greedy tokens, including with chunked prefill over an image."""

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from tests.mm_fixtures import IMAGE_TOKENS, HFLlava, llava_registry, make_image, tiny_llava  # noqa: E402,F401
from weavelm import LLM, SamplingParams  # noqa: E402

PROMPT = "USER: <image>\nWhat is this? ASSISTANT:"


@pytest.fixture
def exact_conv():
    """cuDNN convolutions (the patch embedding) default to TF32 on Ampere+; the CPU reference is exact fp32."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("budget", [8192, 16])
def test_llava_on_cuda_matches_transformers(tiny_llava, llava_registry, budget, exact_conv):
    llm = LLM(tiny_llava, registry=llava_registry, dtype="float32", device="cuda",
              cache={"num_blocks": 64, "block_size": 16}, model_runner={"cuda_graph_max_bs": 8},
              scheduler={"max_num_batched_tokens": budget, "encoder_cache_size": max(budget, IMAGE_TOKENS)})
    assert llm.engine.client.core.async_scheduling
    images = [make_image(0), make_image(1)]
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": im}} for im in images] + ["Hello there"],
                        sp, use_tqdm=False)
    hf = HFLlava(tiny_llava)
    want = [hf.greedy(PROMPT, [im], 12) for im in images] + [hf.greedy("Hello there", None, 12)]
    assert [o.outputs[0].token_ids for o in outs] == want
    llm.shutdown()
