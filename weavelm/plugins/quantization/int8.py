"""`quantization: {name: int8}`: per-output-channel int8 weight-only quantization of a float checkpoint, on load.

Every linear layer (and, with `lm_head: true`, the logits projection) is loaded dense, then quantized once in
`process_weights_after_loading` (symmetric, scale = max |w| / 127 per output row) and multiplied by torch's
`_weight_int8pack_mm` (bf16 activations on CPU). Other devices dequantize per call (correct, not yet fast: GPU
int8/fp8 kernels are future methods of this same kind).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from weavelm.core.hookspecs import hookimpl
from weavelm.core.quantization import QuantizationConfig, QuantizeMethodBase, QuantSpec, layer_kind
from weavelm.ops.quant_kernels import BlockQ8Pack, Int8Pack, LogitsPack, packed_linear


class Int8Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lm_head: bool = Field(True, description="Also quantize the logits projection (the tied embedding's copy).")


class Int8LinearMethod(QuantizeMethodBase):
    kind = "int8"

    def __init__(self, keep_dense: bool = False):
        self.keep_dense = keep_dense  # embeddings still look rows up in the dense weight

    def create_weights(self, layer: torch.nn.Module) -> None:
        pass  # loads dense; quantized after loading

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self.keep_dense:
            layer.qpack = LogitsPack.from_dense(layer.weight.data)
            return
        layer.qpack = Int8Pack.quantize(layer.weight.data)
        if not self.keep_dense:
            layer.register_parameter("weight", None)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return packed_linear(layer.qpack, x, bias)

    def native_pack(self, layer: torch.nn.Module) -> BlockQ8Pack | None:
        """The per-channel codes as blocks (each row's scale repeated), for the native fp32 kernels on the CPU."""
        pack = layer.qpack
        return pack.blocks() if isinstance(pack, Int8Pack) and pack.q.is_cpu else None


class Int8Config(QuantizationConfig):
    name = "int8"
    description = "Per-channel int8 weight-only quantization of a float checkpoint on load (torch int8 kernels)."
    Options = Int8Options

    @classmethod
    def check(cls, spec: QuantSpec) -> list[str]:
        if any(t.startswith(("Q", "IQ")) for t in spec.weight_types.values()):
            return ["the checkpoint is already quantized (GGUF); use quantization: gguf or none"]
        return []

    def get_quant_method(self, layer, prefix):
        kind = layer_kind(layer)
        if kind == "linear":
            return Int8LinearMethod()
        if kind == "embedding" and self.options.lm_head:
            return Int8LinearMethod(keep_dense=True)
        return None


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("quantization", Int8Config.name, Int8Config)
