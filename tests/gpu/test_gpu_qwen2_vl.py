"""On CUDA: the tiny Qwen2-VL (M-RoPE steps run eagerly) gives transformers' greedy tokens (CPU, fp32) for a
batch of two image prompts and a text prompt, with and without a 16-token chunked prefill over the images."""

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from tests.qwen2_vl_fixtures import image, image_prompt, session_model  # noqa: E402
from tests.test_multimodal_qwen2_vl import HFQwen2VL  # noqa: E402
from weavelm import LLM, SamplingParams  # noqa: E402
from weavelm.core.registry import Registry, RegistrySpec  # noqa: E402


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("budget", [8192, 16])
def test_qwen2_vl_on_cuda_matches_transformers(tmp_path_factory, kind, budget):
    path = session_model(tmp_path_factory, kind)
    registry = Registry.from_spec(RegistrySpec(modules=(f"weavelm.plugins.models.{kind}",)))
    llm = LLM(path, registry=registry, dtype="float32", device="cuda", cache={"num_blocks": 64, "block_size": 16},
              model_runner={"cuda_graph_max_bs": 8}, scheduler={"max_num_batched_tokens": budget},
              multimodal={"limit_mm_per_prompt": {"image": 2}})
    prompts = [(image_prompt(1, "Describe this picture."), [image(0, 56, 84)]),
               (image_prompt(2, "Which is brighter?"), [image(1, 100, 70), image(2, 60, 60)]),
               ("A text prompt without pictures:", None)]
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    try:
        outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": ims}} if ims else p for p, ims in prompts],
                            sp, use_tqdm=False)
    finally:
        llm.shutdown()
    hf = HFQwen2VL(path, kind)
    assert [o.outputs[0].token_ids for o in outs] == [hf.greedy(p, ims) for p, ims in prompts]
