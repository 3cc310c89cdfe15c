"""`quantization: {name: gguf}`: llama.cpp's quantized blocks stay quantized (picked by `auto` for GGUF files).

Each linear layer's weight loader is wrapped so that, instead of dequantizing, it keeps every checkpoint part's raw
blocks (the loader hands quantized tensors as `weavelm.core.quantization.QuantizedTensor`: `quant_type`,
`raw_rows()`). After loading, the layer is repacked once. With fp32 activations and
weavelm's native CPU kernels (the default; `weavelm.ops.native`), the blocks stay llama.cpp's and the matmul runs
in fp32, equal to the dequantized model up to rounding order:
- all parts Q4_0 / Q4_1 / Q4_K: `BlockQ4Pack`, llama.cpp's exact codes, scales and mins;
- all parts Q8_0: `BlockQ8Pack`, exact;
- any other mix (Q5_x, Q6_K, ...): `BlockQ8Pack` of the dequantized values, re-quantized per 32-element block.
Otherwise (`dtype: bfloat16`, or no C compiler to build the native kernels), torch's CPU kernels, which run in bf16:
- all parts Q4_0 / Q4_1 / Q4_K: the same codes with the scales rounded to bf16 (`Int4Pack`);
- anything else: one per-channel int8 pack (`Int8Pack`) of the dequantized values.
Float parts only: left dense.
The embedding keeps its dense rows for lookup; its logits projection (tied or untied head) gets its own pack the
same way. Tensor parallelism is not supported by this scheme (check says so; `auto` then loads dense).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from weavelm.core.hookspecs import hookimpl
from weavelm.core.quantization import (QuantizationConfig, QuantizedTensor, QuantizeMethodBase, QuantSpec,
                                      layer_kind)
from weavelm.ops import native
from weavelm.ops.quant_kernels import BlockQ4Pack, BlockQ8Pack, Int4Pack, Int8Pack, LogitsPack, packed_linear
from weavelm.plugins.quantization.gguf_blocks import INT4_TYPES, decode_int4, decode_int4_dm, decode_q8_0

SHARD_ORDER = ("q", "k", "v")


class GGUFOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lm_head: bool = Field(True, description="Pack the logits projection too (else it runs on the dense rows).")


class GGUFLinearMethod(QuantizeMethodBase):
    """Defers the 4-bit parts (their raw blocks are repacked after loading); every other part loads dense as before.
    `keep_dense` (the embedding): every part also loads dense, for row lookup."""

    def __init__(self, keep_dense: bool = False):
        self.keep_dense = keep_dense
        self.kind = "gguf-dense"

    def create_weights(self, layer: torch.nn.Module) -> None:
        layer.gguf_parts = {}
        original = getattr(layer.weight, "weight_loader", None) or _copy_loader

        def stage(param, loaded, shard_id=None):
            ggml_type = loaded.quant_type if isinstance(loaded, QuantizedTensor) else "dense"
            layer.gguf_parts[shard_id] = (ggml_type, loaded, original)
            if self.keep_dense or ggml_type not in INT4_TYPES:
                original(param, loaded, shard_id)

        layer.weight.weight_loader = stage

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        parts = layer.gguf_parts
        del layer.gguf_parts
        keys = sorted(parts, key=_shard_key)
        types = {parts[k][0] for k in keys}
        if not parts or types == {"dense"}:
            return  # float weights stay dense (apply runs F.linear)
        blocks = native.available() and layer.weight.dtype == torch.float32 and layer.weight.device.type == "cpu"
        if types <= set(INT4_TYPES):
            if blocks:
                decoded = [decode_int4_dm(t, loaded.raw_rows()) for t, loaded, _ in (parts[k] for k in keys)]
                layer.qpack = BlockQ4Pack.from_codes(*(np.concatenate([d[i] for d in decoded]) for i in range(3)))
                self.kind = "gguf-q4-blocks"
            else:
                decoded = [decode_int4(t, loaded.raw_rows()) for t, loaded, _ in (parts[k] for k in keys)]
                q, scale, zero = (np.concatenate([d[i] for d in decoded]) for i in range(3))
                layer.qpack = Int4Pack.from_codes(q, scale, zero)
                self.kind = "gguf-int4"
        elif blocks and types == {"Q8_0"}:
            decoded = [decode_q8_0(loaded.raw_rows()) for _, loaded, _ in (parts[k] for k in keys)]
            layer.qpack = BlockQ8Pack.from_codes(*(np.concatenate([d[i] for d in decoded]) for i in range(2)))
            self.kind = "gguf-q8-blocks"
        else:
            for k in keys:  # mixed with other types: the deferred 4-bit parts load dense now
                t, loaded, original = parts[k]
                if t in INT4_TYPES and not self.keep_dense:
                    original(layer.weight, loaded, k)
            if blocks:
                layer.qpack = BlockQ8Pack.quantize(layer.weight.data)
                self.kind = "gguf-q8-blocks"
            else:
                layer.qpack = LogitsPack.from_dense(layer.weight.data) if self.keep_dense else \
                    Int8Pack.quantize(layer.weight.data)
                self.kind = "gguf-int8"
        if not self.keep_dense:
            layer.register_parameter("weight", None)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        pack = getattr(layer, "qpack", None)
        if pack is None:
            return torch.nn.functional.linear(x, layer.weight, bias)
        return packed_linear(pack, x, bias)

    def native_pack(self, layer: torch.nn.Module) -> BlockQ4Pack | BlockQ8Pack | None:
        pack = getattr(layer, "qpack", None)
        return pack if isinstance(pack, (BlockQ4Pack, BlockQ8Pack)) else None


def _copy_loader(param, loaded, shard_id=None) -> None:
    from weavelm.core.model_files import materialize
    with torch.no_grad():
        param.data.copy_(materialize(loaded))


def _shard_key(shard_id) -> tuple:
    if shard_id is None:
        return (0, 0)
    if shard_id in SHARD_ORDER:
        return (1, SHARD_ORDER.index(shard_id))
    return (2, shard_id)


class GGUFConfig(QuantizationConfig):
    name = "gguf"
    description = ("GGUF blocks kept quantized on the CPU: fp32 native block kernels (Q4_0/Q4_1/Q4_K/Q8_0 exact), "
                   "or torch's bf16 int4/int8 kernels.")
    Options = GGUFOptions

    @classmethod
    def check(cls, spec: QuantSpec) -> list[str]:
        reasons = []
        if spec.device != "cpu":
            reasons.append(f"its kernels run on the CPU (device is {spec.device}); use quantization: none")
        if spec.world_size != 1:
            reasons.append("it does not support tensor parallelism; use tensor_parallel_size 1")
        if not any(t.startswith("Q") for t in spec.weight_types.values()):
            reasons.append("the checkpoint holds no GGUF quantized tensors")
        if not native.available() and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            reasons.append(f"torch {torch.__version__} lacks aten._weight_int4pack_mm_for_cpu")
        return reasons

    def get_quant_method(self, layer, prefix):
        kind = layer_kind(layer)
        if kind == "linear":
            return GGUFLinearMethod()
        if kind == "embedding" and self.options.lm_head:
            return GGUFLinearMethod(keep_dense=True)
        return None


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("quantization", GGUFConfig.name, GGUFConfig)
