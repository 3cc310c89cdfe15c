"""fp8 kernels (weavelm/ops/fp8_kernels.py, fp8_triton.py) against their float32 torch references.

Without CUDA the Triton block-scaled GEMM runs in triton's interpreter (TRITON_INTERPRET=1, set for this module only,
as in test_triton_ops.py) at small shapes with partial edge tiles. Both sides multiply the same fp8 codes and
scales; only the summation order differs, so the tolerance is float32 accumulation error: rtol 1e-4, atol 1e-3
on outputs of magnitude ~10-100. The `gpu` tests check the kernel and `torch._scaled_mm` on the card (bf16 output:
rtol 1.6e-2) and that the engine picks W8A8 there.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

from weavelm.ops import fp8_kernels as fp8

ON_GPU = torch.cuda.is_available()
KERNELS = "weavelm.ops.fp8_triton"


def _import_triton_for_interpreter():
    if "triton" in sys.modules:
        if type(sys.modules["triton.language"].sum).__name__ != "InterpretedFunction":
            pytest.skip("triton was imported without TRITON_INTERPRET=1 earlier in this process; run this module "
                        "alone to test the kernels on CPU", allow_module_level=True)
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton")
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = old


if not ON_GPU:
    _import_triton_for_interpreter()


@pytest.fixture(scope="module")
def kernels():
    """weavelm.ops.fp8_triton, its kernel built for the interpreter on CPU (the module is reloaded under
    TRITON_INTERPRET=1 if it was imported for a GPU earlier in this process)."""
    if ON_GPU:
        yield importlib.import_module(KERNELS)
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    mod = importlib.import_module(KERNELS)
    if type(mod._block_fp8_mm_kernel).__name__ != "InterpretedFunction":
        mod = importlib.reload(mod)
    yield mod
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


def operands(m: int, n: int, k: int, group: tuple[int, int], device: str = "cpu"):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=gen).to(device)
    w = (torch.randn(n, k, generator=gen) * 0.3).to(device)
    a, a_scale = fp8.quantize_per_token_group(x, group[1])
    b, b_scale = fp8.quantize(w, group)
    return x, w, a, a_scale, b, b_scale


def test_quantize_round_trips_within_fp8_precision():
    w = torch.randn(200, 300)
    for group in ((128, 128), (1, 128), (1, 300)):
        q, s = fp8.quantize(w, group)
        assert q.dtype == fp8.FP8_DTYPE and tuple(s.shape) == (-(-200 // group[0]), -(-300 // group[1]))
        torch.testing.assert_close(fp8.dequantize(q, s, group), w, rtol=0.07, atol=1e-3)  # e4m3: 3 mantissa bits


@pytest.mark.parametrize("m, n, k, group", [(5, 200, 300, (128, 128)), (17, 96, 256, (1, 128)),
                                            (3, 130, 64, (128, 64))])
def test_block_scaled_mm_matches_reference_in_interpreter(kernels, m, n, k, group):
    _, _, a, a_scale, b, b_scale = operands(m, n, k, group)
    bias = torch.randn(n)
    ref = fp8.block_scaled_mm_reference(a, a_scale, b, b_scale, group, torch.float32) + bias
    out = kernels.block_scaled_mm(a, a_scale, b, b_scale, group, torch.float32, bias)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 64, 300])
def test_gpu_block_scaled_mm_and_scaled_mm_match_reference(kernels, m):
    if not fp8.fp8_supported(torch.device("cuda")):
        pytest.skip("needs fp8 (sm89+)")
    n, k = 4096 + 64, 2048 + 64  # partial edge blocks
    _, _, a, a_scale, b, b_scale = operands(m, n, k, (128, 128), "cuda")
    ref = fp8.block_scaled_mm_reference(a, a_scale, b, b_scale, (128, 128), torch.float32)
    out = kernels.block_scaled_mm(a, a_scale, b, b_scale, (128, 128), torch.bfloat16)
    torch.testing.assert_close(out.float(), ref, rtol=1.6e-2, atol=1e-1)
    x, w, *_ = operands(m, n, k, (1, k), "cuda")
    q, s = fp8.quantize(w, (1, k))
    xq, xs = fp8.quantize_per_token(x.bfloat16())
    ref = fp8.block_scaled_mm_reference(xq, xs, q, s, (1, k), torch.float32)
    out = fp8.scaled_mm_rowwise(x.bfloat16(), q, s, None)
    torch.testing.assert_close(out.float(), ref, rtol=1.6e-2, atol=1e-1)


def test_scaled_mm_rowwise_matches_reference():
    """torch._scaled_mm's row-wise W8A8 (CPU kernels where torch has them): dynamic per-token and static scales."""
    x, w, *_ = operands(5, 48, 64, (1, 64))
    q, s = fp8.quantize(w, (1, 64))
    for input_scale in (None, torch.tensor(0.02)):
        try:
            out = fp8.scaled_mm_rowwise(x.bfloat16(), q, s, None, input_scale)
        except (RuntimeError, NotImplementedError) as e:
            pytest.skip(f"torch._scaled_mm does not run here: {e}")
        xq, xs = fp8.quantize_per_token(x.bfloat16(), input_scale)
        ref = fp8.block_scaled_mm_reference(xq, xs, q, s, (1, 64), torch.float32)
        torch.testing.assert_close(out.float(), ref, rtol=1.6e-2, atol=2e-2)  # bf16 output


@pytest.mark.parametrize("mode, group", [("w8a8-block-triton", (128, 128)), ("w8a8-block-triton", (1, 128)),
                                         ("w8a8-scaled-mm", (1, 320))])
def test_fp8_method_w8a8_paths_agree_with_weight_only(kernels, mode, group):
    """The layer method's W8A8 paths (chosen on sm89+ GPUs; forced here on the CPU) against its weight-only path:
    they differ only by the activations' fp8 rounding (3 mantissa bits: a few percent of a typical output)."""
    from weavelm.distributed import TensorParallelGroup
    from weavelm.layers import RowParallelLinear
    from weavelm.plugins.quantization.fp8_layer import Fp8Format, Fp8LinearMethod

    layer = RowParallelLinear(320, 200, True, TensorParallelGroup())
    method = Fp8LinearMethod(Fp8Format(block=group if group[1] < 320 else None))
    layer.quant_method = method
    method.create_weights(layer)
    _, w, *_ = operands(1, 200, 320, group)
    q, s = fp8.quantize(w, method.group)
    layer.weight.data.copy_(q)
    getattr(layer, method.fmt.scale_name).data.copy_(s)
    layer.bias.data.normal_()
    method.process_weights_after_loading(layer)
    x = torch.randn(2, 3, 320)
    want = method.apply(layer, x, layer.bias)
    method.mode = mode
    got = method.apply(layer, x, layer.bias)
    assert got.shape == want.shape == (2, 3, 200)
    torch.testing.assert_close(got.float(), want.float(), rtol=0.1, atol=0.15 * want.abs().mean().item())
