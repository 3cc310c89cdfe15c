"""The declared types between loaders, quantization methods and the native CPU stack (weavelm/core/quantization.py):
a loader hands a tensor stored quantized as a `QuantizedTensor` (its format's name and its stored rows), and the
native stack gets a layer's block pack only by asking its method (`QuantizeMethodBase.native_pack`)."""

import numpy as np
import pytest
import torch

from tests.gguf_fixtures import model_zoo
from weavelm.plugin import QuantizedTensor, QuantizeMethodBase


def test_the_gguf_loader_hands_quantized_tensors_as_the_declared_type():
    from weavelm.plugins.loaders.gguf import GGUFLoader

    loader = GGUFLoader(GGUFLoader.Options())
    seen = {}
    for _, name, tensor in loader.iter_sourced(model_zoo("llama")["gguf_Q8_0"]):
        if isinstance(tensor, QuantizedTensor):
            rows = tensor.raw_rows()
            assert rows.dtype == np.uint8 and rows.shape == (tensor.shape[0], tensor.shape[1] // 32 * 34), name
            seen[name] = tensor.quant_type
        else:
            assert not hasattr(tensor, "quant_type"), name
    assert seen.get("model.layers.0.mlp.down_proj.weight") == "Q8_0"
    assert "model.layers.0.input_layernorm.weight" not in seen  # norms are stored as floats


class _DenseMethod(QuantizeMethodBase):
    """A third-party method that keeps the dense weight: it has no native pack."""

    def create_weights(self, layer):
        pass

    def process_weights_after_loading(self, layer):
        pass

    def apply(self, layer, x, bias=None):
        return torch.nn.functional.linear(x, layer.weight, bias)


def test_native_pack_is_asked_of_the_method():
    from weavelm.core.quantization import native_pack
    from weavelm.ops.quant_kernels import BlockQ8Pack
    from weavelm.plugins.quantization.int8 import Int8LinearMethod

    layer = torch.nn.Linear(64, 8, bias=False)
    assert native_pack(layer) is None  # no method
    layer.quant_method = _DenseMethod()
    assert native_pack(layer) is None  # the default: no pack
    dense = layer.weight.detach().clone()
    layer.quant_method = Int8LinearMethod()
    layer.quant_method.process_weights_after_loading(layer)
    pack = native_pack(layer)
    assert isinstance(pack, BlockQ8Pack) and (pack.n, pack.k) == (8, 64)
    torch.testing.assert_close(pack.dequantize(), layer.qpack.dequantize())
    assert (pack.dequantize() - dense).abs().max() <= dense.abs().max() / 127


@pytest.mark.parametrize("quantization", ["int8", "gguf"])
def test_the_native_stack_is_built_only_from_method_packs(quantization, tiny_llama, one_torch_thread, monkeypatch):
    """With every linear's method offering a pack, the native stack runs; replace one method by a third party's
    without a pack and the model takes the per-layer path (the same tokens)."""
    from weavelm import LLM, SamplingParams
    from weavelm.ops import native
    from weavelm.plugins.models.native_stack import NativeStack

    if not native.available():
        pytest.skip(native.unavailable_reason())
    path = tiny_llama if quantization == "int8" else model_zoo("llama")["gguf_Q8_0"]
    llm = LLM(model=path, dtype="float32", device="cpu", quantization=quantization, cache={"num_blocks": 32})
    model = llm.collective_rpc("apply_model", (lambda m: m,))[0]  # in-process: the model itself
    assert NativeStack.build(model) is not None
    model.layers[-1].mlp.down_proj.quant_method = _DenseMethod()
    assert NativeStack.build(model) is None
