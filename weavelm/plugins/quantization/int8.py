"""`quantization: {name: int8}`: per-output-channel int8 weight-only quantization of a float checkpoint, on load.

Every linear layer (and, with `lm_head: true`, the logits projection) is loaded dense, then quantized once in
`process_weights_after_loading` (symmetric, scale = max |w| / 127 per output row, rounded to bf16). Where it runs:
- CPU: the native fp32 block kernels, or torch's `_weight_int8pack_mm` (bf16 activations), unchanged;
- CUDA, fp16/bf16 activations: the codes stay int8 on the GPU and `weavelm.ops.triton_int_gemm.int8_gemm` multiplies
  them (each int8 tile converted to the activation dtype in registers, fp32 accumulation, the row scale applied to
  the fp32 sum): weight-only, so the result is the dequantized weight's GEMM up to accumulation order, and no dense
  copy is ever made. (fp32 activations on CUDA dequantize per call.)
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from weavelm.core.hookspecs import hookimpl
from weavelm.core.quantization import QuantizationConfig, QuantizeMethodBase, QuantSpec, layer_kind
from weavelm.ops.quant_kernels import KERNEL_DTYPE, BlockQ8Pack, Int8Pack, LogitsPack, packed_linear

GPU_DTYPES = (torch.float16, torch.bfloat16)
ROWS_PER_PASS = 4096


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
        w = layer.weight.data
        int8 = quantize_on_device(w) if w.is_cuda else Int8Pack.quantize(w)
        if self.keep_dense:
            layer.qpack = LogitsPack(int8, w.detach())
        else:
            layer.qpack = int8
            layer.register_parameter("weight", None)
        if w.is_cuda and w.dtype in GPU_DTYPES:
            self.kind = "int8-triton"

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.is_cuda and x.dtype in GPU_DTYPES:
            return _gpu_linear(layer.qpack, x, bias)
        return packed_linear(layer.qpack, x, bias)

    def native_pack(self, layer: torch.nn.Module) -> BlockQ8Pack | None:
        """The per-channel codes as blocks (each row's scale repeated), for the native fp32 kernels on the CPU."""
        pack = layer.qpack
        return pack.blocks() if isinstance(pack, Int8Pack) and pack.q.is_cpu else None


def quantize_on_device(w: torch.Tensor) -> Int8Pack:
    """`Int8Pack.quantize` computed where the weight lives (the same formula: scale = max |w| / 127 rounded to
    bf16, q = round(w / scale) clamped to +-127), without a round trip through host memory."""
    w = w.detach()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=KERNEL_DTYPE, device=w.device)
    for start in range(0, w.shape[0], ROWS_PER_PASS):  # fp32 temporaries of a slab of rows, not of the matrix
        rows = w[start:start + ROWS_PER_PASS].float()
        s = (rows.abs().amax(dim=1) / 127.0).clamp_min(1e-12).to(KERNEL_DTYPE)
        scale[start:start + ROWS_PER_PASS] = s
        q[start:start + ROWS_PER_PASS] = torch.round(rows / s.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Pack(q, scale)


def _gpu_linear(pack: Int8Pack | LogitsPack, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    from weavelm.ops.triton_int_gemm import int8_gemm

    int8 = pack.int8 if isinstance(pack, LogitsPack) else pack
    y = int8_gemm(x.reshape(-1, x.shape[-1]), int8.q, int8.scale)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


class Int8Config(QuantizationConfig):
    name = "int8"
    description = "Per-channel int8 weight-only quantization of a float checkpoint on load (torch int8 kernels)."
    Options = Int8Options

    @classmethod
    def how_it_runs(cls, device: str) -> str:
        if device == "cuda":
            return "int8 weight-only: codes kept int8 on the GPU, Triton int8 GEMM (fp16/bf16)"
        return "int8 weight-only: native fp32 block kernels, or torch's bf16 int8 kernel"

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
