"""Contract suite for attention backends: every registered backend against torch_ref on hand-built batches.

Each test skips a backend whose `check()` refuses the case (its reasons are the skip message). Without CUDA the
Triton kernels run in triton's interpreter (TRITON_INTERPRET=1, set for this module only) at small shapes.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

from tests.attention_utils import make_batch, reference_output, rel_err
from weavelm.core.forward import AttentionSpec
from weavelm.core.registry import get_registry

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
KERNELS = "weavelm.plugins.attention.triton.kernels"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
BACKENDS = get_registry().names("attention")
# prefill chunk with a cached prefix, decode, fresh prefill, decode, short chunk with a long prefix
MIXED = ([5, 1, 17, 1, 3], [11, 40, 0, 7, 70])


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter_without_cuda():
    if ON_GPU:
        yield
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    mod = sys.modules.get(KERNELS)
    if mod is not None and type(mod._paged_attention_kernel).__name__ != "InterpretedFunction":
        importlib.reload(mod)  # compiled for a GPU earlier in this process: rebuild under the interpreter
    yield
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


def backend_or_skip(name: str, num_heads: int, num_kv_heads: int, head_size: int, block_size: int,
                    dtype: torch.dtype, device: str = DEVICE, **options):
    cls = get_registry().get("attention", name)
    reasons = cls.check(AttentionSpec(device, dtype, head_size, num_heads, num_kv_heads, block_size))
    if reasons:
        pytest.skip(f"{name}: {'; '.join(reasons)}")
    return cls(cls.Options(**options))


def run_backend(backend, b, device: str = DEVICE) -> tuple[torch.Tensor, torch.Tensor]:
    impl = backend.make_impl(b.num_heads, b.num_kv_heads, b.head_size, b.scale)
    meta = backend.make_builder(torch.device(device)).build(b.meta)
    cache = b.kv_cache.clone()
    out = impl.forward(b.q, b.k, b.v, cache, meta)
    assert out.shape == b.q.shape and out.dtype == b.q.dtype
    return out, cache


def check_against_reference(backend, b, dtype: torch.dtype) -> None:
    ref, ref_cache = reference_output(b)
    out, cache = run_backend(backend, b)
    n = b.meta.num_actual_tokens
    assert torch.equal(cache, ref_cache), "new K/V were not written exactly at slot_mapping"
    err = rel_err(out[:n], ref)
    assert err <= TOL[dtype], f"relative error {err:.2e} > {TOL[dtype]:.0e}"
    assert torch.isfinite(out[n:]).all(), "padded rows must be finite"


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("name", BACKENDS)
def test_mixed_prefill_and_decode(name, head_size, gqa, block_size):
    dtype = torch.float32
    backend = backend_or_skip(name, 2 * gqa, 2, head_size, block_size, dtype)
    b = make_batch(*MIXED, num_heads=2 * gqa, num_kv_heads=2, head_size=head_size, block_size=block_size,
                   dtype=dtype, device=DEVICE, seed=head_size + gqa + block_size)
    check_against_reference(backend, b, dtype)


@pytest.mark.parametrize("name", BACKENDS)
def test_decode_only_with_graph_padding(name):
    """A padded decode batch as CUDA graphs run it: extra rows with slot -1 must not touch the cache."""
    cls = get_registry().get("attention", name)
    if not cls.graph_safe:
        pytest.skip(f"{name} is not graph-safe, so it never sees padded rows")
    backend = backend_or_skip(name, 8, 2, 64, 16, torch.float32)
    b = make_batch([1] * 4, [150, 0, 33, 64], num_heads=8, num_kv_heads=2, head_size=64, block_size=16,
                   device=DEVICE, pad_tokens=3, seed=1)
    check_against_reference(backend, b, torch.float32)


@pytest.mark.parametrize("num_splits", [1, 2, 8])
def test_triton_split_kv_decode(num_splits):
    backend = backend_or_skip("triton", 4, 1, 64, 16, torch.float32, num_splits=num_splits)
    b = make_batch([1] * 3, [300, 5, 129], num_heads=4, num_kv_heads=1, head_size=64, block_size=16,
                   device=DEVICE, pad_tokens=2, seed=num_splits)
    meta = backend.make_builder(torch.device(DEVICE)).build(b.meta)
    assert meta.launch_config(1)["num_splits"] == num_splits
    check_against_reference(backend, b, torch.float32)


@pytest.mark.parametrize("block_m,tile_n,num_splits", [(16, 16, 1), (64, 16, 4), (128, 32, 2), (16, 128, 1)])
def test_triton_kernel_launch_configs(block_m, tile_n, num_splits):
    """Any tile shape and split count is correct, on mixed batches too (tiles smaller than a cache block)."""
    backend_or_skip("triton", 8, 2, 64, 32, torch.float32)
    kernels = importlib.import_module(KERNELS)
    b = make_batch(*MIXED, num_heads=8, num_kv_heads=2, head_size=64, block_size=32, device=DEVICE, seed=tile_n)
    ref, cache = reference_output(b)
    n, m = b.meta.num_actual_tokens, b.meta
    out = torch.empty(n, 8, 64, device=DEVICE)
    kernels.paged_attention(b.q.view(n, 8, 64), cache[0], cache[1], out, m.block_table, m.seq_lens,
                            m.query_start_loc, m.num_reqs, b.scale, block_m=block_m, tile_n=tile_n,
                            num_splits=num_splits)
    assert rel_err(out.view(n, -1), ref) <= 1e-5


def test_triton_odd_head_size():
    backend = backend_or_skip("triton", 6, 2, 80, 16, torch.float32)
    b = make_batch(*MIXED, num_heads=6, num_kv_heads=2, head_size=80, block_size=16, device=DEVICE, seed=3)
    check_against_reference(backend, b, torch.float32)


def test_check_reasons_name_the_problem():
    triton_cls = get_registry().get("attention", "triton")
    reasons = triton_cls.check(AttentionSpec("cuda", torch.float32, 72, 8, 3, 16))
    assert any("head_size 72" in r for r in reasons)
    assert any("multiple of num_kv_heads" in r for r in reasons)
    flash_cls = get_registry().get("attention", "flash_attn")
    assert flash_cls.check(AttentionSpec("cpu", torch.bfloat16, 128, 8, 8, 16)) == [
        "device 'cpu': flash-attn kernels need CUDA"]
    if not ON_GPU:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        code = ("import torch; from weavelm.core.registry import get_registry; from weavelm.core.forward import "
                "AttentionSpec; print(get_registry().get('attention', 'triton').check("
                "AttentionSpec('cpu', torch.float32, 64, 8, 8, 16)))")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert "need CUDA (or TRITON_INTERPRET=1" in out.stdout


def test_listing_backends_imports_neither_triton_nor_flash_attn():
    code = ("import sys, weavelm.plugins.attention.triton.backend, weavelm.plugins.attention.flash_attn; "
            "print(sorted(m for m in ('triton', 'flash_attn', 'flash_attn_interface') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- on the GPU: long contexts, bf16, head 256, CUDA graphs --------------------------------------------------

LONG = ([1, 1, 1, 300, 1, 64], [8191, 4000, 17, 3800, 2047, 0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_size,gqa", [(64, 8), (128, 4), (128, 1), (256, 2)])
@pytest.mark.parametrize("name", BACKENDS)
def test_long_context_gpu(name, head_size, gqa, dtype):
    backend = backend_or_skip(name, 4 * gqa, 4, head_size, 16, dtype, device="cuda")
    b = make_batch(*LONG, num_heads=4 * gqa, num_kv_heads=4, head_size=head_size, block_size=16, dtype=dtype,
                   device="cuda", seed=head_size * gqa)
    check_against_reference(backend, b, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("name", BACKENDS)
def test_long_decode_only_gpu(name):
    backend = backend_or_skip(name, 32, 8, 128, 16, torch.bfloat16, device="cuda")
    b = make_batch([1] * 5, [8191, 6000, 1, 4095, 300], num_heads=32, num_kv_heads=8, head_size=128,
                   block_size=16, dtype=torch.bfloat16, device="cuda", seed=5)
    check_against_reference(backend, b, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("name", BACKENDS)
def test_cuda_graph_replay_gpu(name):
    """Capture a padded decode batch, refill its static buffers with another batch, replay, compare."""
    cls = get_registry().get("attention", name)
    if not cls.graph_safe:
        pytest.skip(f"{name} is not graph-safe")
    dtype = torch.bfloat16
    backend = backend_or_skip(name, 16, 4, 128, 16, dtype, device="cuda")
    b = make_batch([1] * 6, [5000, 3, 700, 1200, 64, 2500], num_heads=16, num_kv_heads=4, head_size=128,
                   block_size=16, dtype=dtype, device="cuda", pad_tokens=2, seed=7)
    ref, ref_cache = reference_output(b)
    impl = backend.make_impl(b.num_heads, b.num_kv_heads, b.head_size, b.scale)
    m = b.meta
    static = {f: getattr(m, f).clone() for f in ("query_start_loc", "seq_lens", "block_table", "slot_mapping")}
    static["seq_lens"].fill_(1)
    static["block_table"].zero_()
    static["slot_mapping"].fill_(-1)
    meta = backend.make_builder(torch.device("cuda")).build(type(m)(**{**vars(m), **static}))
    q, k, v, cache = b.q.clone().zero_(), b.k.clone(), b.v.clone(), b.kv_cache.clone()
    impl.forward(q, k, v, cache, meta)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = impl.forward(q, k, v, cache, meta)
    for f, t in static.items():
        t.copy_(getattr(m, f))
    q.copy_(b.q)
    cache.copy_(b.kv_cache)
    graph.replay()
    torch.cuda.synchronize()
    n = m.num_actual_tokens
    assert torch.equal(cache, ref_cache)
    assert rel_err(out[:n], ref) <= TOL[dtype]
    assert torch.isfinite(out).all()
