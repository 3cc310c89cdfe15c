"""`quantization: int8` on CUDA keeps the weights int8 in GPU memory, quantized there (`quantize_on_device`: the
same codes and scales as the CPU's `Int8Pack.quantize`, checked here on the CPU), and multiplies them with the Triton
weight-only GEMM (weavelm/ops/triton_int_gemm.py; its CPU-interpreter parity test is in test_quant_int4.py). The
`gpu` test runs on the device machine (`-m gpu`).

Bounds: the layer's output against F.linear on the dequantized int8 weight within 1% of the output's max (bf16
activations and tiles, fp32 accumulation); the engine's logits against the dense bf16 engine within the 5% relative
RMS that test_quantization.py states for per-channel int8 on this fixture.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F



def test_quantize_on_device_equals_the_cpu_quantization(monkeypatch):
    from weavelm.ops.quant_kernels import Int8Pack
    from weavelm.plugins.quantization import int8

    monkeypatch.setattr(int8, "ROWS_PER_PASS", 7)  # several slabs, the last one partial
    w = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
    w[3] = 0.0  # an all-zero row: the 1e-12 floor
    on_device, on_cpu = int8.quantize_on_device(w), Int8Pack.quantize(w)
    assert torch.equal(on_device.q, on_cpu.q) and torch.equal(on_device.scale, on_cpu.scale)


def _engine(path, **kw):
    from weavelm import LLM
    return LLM(model=path, device="cuda", dtype="bfloat16", **kw)


def _model(llm):
    return llm.collective_rpc("apply_model", (lambda model: model,))[0]


def _first_logits(llm, prompt):
    from weavelm import SamplingParams

    captured = []
    llm.collective_rpc("set_logits_hook", (lambda ids, logits: captured.append(logits.clone()) or None,))
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, temperature=0))
    return captured[0].float().cpu()


@pytest.mark.gpu
def test_int8_stays_int8_on_cuda_and_matches_its_dequantized_weight(tiny_llama):
    quant = _engine(tiny_llama, quantization="int8")
    layer = _model(quant).layers[0].mlp.gate_up_proj
    pack = layer.qpack
    assert layer.weight is None and pack.q.dtype == torch.int8 and pack.q.is_cuda
    assert layer.quant_method.kind == "int8-triton"
    dense_w = pack.dequantize().cuda()
    for rows in (1, 9, 300):  # decode (split K), small batch, prefill tiles
        x = torch.randn(rows, dense_w.shape[1], device="cuda", dtype=torch.bfloat16)
        y = layer.quant_method.apply(layer, x).float()
        ref = F.linear(x.float(), dense_w)
        assert (y - ref).abs().max() <= 0.01 * ref.abs().max()
    dense = _engine(tiny_llama)
    prompt = [5, 17, 42, 99, 3]
    q, d = _first_logits(quant, prompt), _first_logits(dense, prompt)
    assert ((q - d).pow(2).mean().sqrt() / d.pow(2).mean().sqrt()).item() < 0.05
