"""On CUDA: the `quantization` interface runs on the GPU too (`int8` packs dequantized per call until a GPU kernel
lands), `auto` keeps a GGUF file dense there (the gguf scheme's kernels are CPU-only), and `attention: auto` does not
pick the `cpu` backend. Tiny random llama, bf16."""

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from tests.gguf_fixtures import SHAPE, state_dict  # noqa: E402
from tests.gguf_writer_util import write_llama_cpp_gguf  # noqa: E402
from tests.model_fixtures import build_tiny_model  # noqa: E402
from weavelm import LLM, SamplingParams  # noqa: E402

POOL = {"num_blocks": 64}  # two engines stay alive in one test: neither may take 90% of the GPU


def _first_logits(llm):
    captured = []
    llm.engine.client.core.executor.worker.runner.set_logits_hook(
        lambda ids, logits: captured.append(logits.float().cpu()) or None)
    llm.generate([{"prompt_token_ids": [5, 17, 42, 99, 3]}], SamplingParams(max_tokens=1, temperature=0))
    return captured[0]


def test_int8_on_cuda_tracks_dense(tiny_llama):
    dense = LLM(model=tiny_llama, device="cuda", dtype="bfloat16", enforce_eager=True, cache=POOL)
    quant = LLM(model=tiny_llama, device="cuda", dtype="bfloat16", enforce_eager=True, quantization="int8",
                cache=POOL)
    assert quant.collective_rpc("model_info")[0]["attention"] != "cpu"
    a, b = _first_logits(dense), _first_logits(quant)
    assert ((a - b).pow(2).mean().sqrt() / a.pow(2).mean().sqrt()).item() < 0.05


def test_gguf_auto_stays_dense_on_cuda(tmp_path):
    from transformers import AutoConfig

    src = build_tiny_model("llama", str(tmp_path / "src"), seed=3, **SHAPE)  # only the one file (the whole zoo
    gguf = write_llama_cpp_gguf(str(tmp_path / "q4k.gguf"), AutoConfig.from_pretrained(src),  # needs tensorizer)
                                state_dict(src), "Q4_K")
    llm = LLM(model=gguf, device="cuda", dtype="bfloat16", enforce_eager=True, cache=POOL)
    model = llm.engine.client.core.executor.worker.runner.bundle.model
    assert all(getattr(m, "quant_method", None) is None for m in model.modules())
