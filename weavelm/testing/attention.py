"""The attention backend contract: a backend's output and cache writes equal the reference on hand-built batches.

Subclass it in your distribution's tests, naming the backend you registered:

    from weavelm.testing.attention import AttentionContract

    class TestMyBackend(AttentionContract):
        backend = "my_backend"          # registered name, found through your installed entry point
        options = {"block_q": 64}       # your backend's Options, if any

Every batch mixes prefill chunks with cached prefixes and decodes, in shuffled (non-contiguous) block tables, and
is compared with `weavelm.ops.reference_attention.paged_attention_ref` (fp32 math): the new K/V must be written
exactly at `slot_mapping`, and the output must match within a dtype tolerance. A case the backend's `check(spec)`
refuses is skipped with its reasons. Without CUDA, `TRITON_INTERPRET=1` is set for the class so Triton kernels
run in triton's interpreter. Tests marked `gpu` (long contexts, CUDA graphs) run only where CUDA is.

Sliding windows (`AttentionSpec.sliding_window`, `make_impl(..., sliding_window=w)`): a query at position p sees
keys p - w + 1 .. p. The windowed cases fill the blocks wholly outside every query's window with large values (the
scheduler frees those blocks and other requests reuse them, while their ids stay in the block table); a backend
whose `reasons(spec)` refuses windows is skipped there, and the engine never uses it for a windowed model.

An fp8 KV cache (`AttentionSpec.kv_cache_dtype`, `impl.k_scale` / `impl.v_scale`): the new K/V must be stored as
`weavelm.ops.kv_quant.quantize_kv` stores them, and the output match the reference on the dequantized cache; a
backend that refuses fp8 is skipped with its reasons.

A backend whose `kv_cache_shape` is not the default `(2, num_blocks, block_size, num_kv_heads, head_size)`
overrides `to_backend_cache` / `from_backend_cache` to convert from and to that layout.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import torch

from weavelm.plugin import AttentionSpec, make_layer_impl
from weavelm.testing._attention_batches import (AttentionBatch, blocks_outside_window, make_batch, reference_output,
                                                rel_err)
from weavelm.testing._registry import component, registry

ON_GPU = torch.cuda.is_available()
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# prefill chunk with a cached prefix, decode, fresh prefill, decode, short chunk with a long prefix
MIXED = ([5, 1, 17, 1, 3], [11, 40, 0, 7, 70])
LONG = ([1, 1, 1, 300, 1, 64], [8191, 4000, 17, 3800, 2047, 0])
# for sliding windows: chunks with cached prefixes longer than the window, decodes, a fresh prefill past the window
WINDOWED = ([5, 1, 40, 1, 3, 24], [11, 40, 0, 7, 70, 90])
# what freed blocks hold in the test (another request's finite data): a backend that gives them any weight fails
FREED_FILL = 1e4


@contextlib.contextmanager
def triton_interpreter_without_cuda(reload: tuple[str, ...] = ()) -> Iterator[None]:
    """Without CUDA, set `TRITON_INTERPRET=1` for the duration (restored after) and reload the modules named in
    `reload` whose `@triton.jit` kernels were built before it was set; with CUDA, do nothing."""
    if ON_GPU:
        yield
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    _interpret_triton_language()
    for name in reload:
        mod = sys.modules.get(name)
        if mod is not None and any(type(v).__name__ == "JITFunction" for v in vars(mod).values()):
            importlib.reload(mod)  # compiled for a GPU earlier in this process: rebuild under the interpreter
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def _interpret_triton_language() -> None:
    """triton.language's own `@triton.jit` helpers (tl.minimum, tl.cdiv, ...) are built when it is first imported;
    imported before TRITON_INTERPRET=1 (torch._dynamo imports triton, e.g. through transformers' generation code),
    they are compiled-kernel functions that an interpreted kernel cannot call ("Cannot call @triton.jit'd outside
    of the scope of a kernel"). Rebuild them under the interpreter and rebind them in `triton.language`."""
    for name in ("triton.language.standard", "triton.language.random"):
        mod = sys.modules.get(name)
        if mod is None or not any(type(v).__name__ == "JITFunction" for v in vars(mod).values()):
            continue
        old = dict(vars(mod))
        importlib.reload(mod)
        lang = sys.modules["triton.language"]
        for attr, value in old.items():
            if type(value).__name__ == "JITFunction" and getattr(lang, attr, None) is value:
                setattr(lang, attr, getattr(mod, attr))


class AttentionContract:
    """The suite; pytest collects it through your `Test...` subclass."""

    backend: ClassVar[str] = ""
    """Registered name of the backend under test."""
    options: ClassVar[dict[str, Any]] = {}
    """Keyword arguments of the backend's `Options`."""
    device: ClassVar[str] = "cuda" if ON_GPU else "cpu"
    interpreter_reload: ClassVar[tuple[str, ...]] = ()
    """Modules holding `@triton.jit` kernels that may have been imported before `TRITON_INTERPRET=1` was set;
    reloaded under the interpreter (CPU only)."""

    # -- fixtures and helpers ----------------------------------------------------------------------------------
    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def _triton_interpreter_without_cuda(cls):
        with triton_interpreter_without_cuda(cls.interpreter_reload):
            yield

    @property
    def backend_cls(self) -> Any:
        assert self.backend, f"{type(self).__name__} must set `backend` to a registered attention backend name"
        return component("attention", self.backend)

    def build_backend(self, num_heads: int, num_kv_heads: int, head_size: int, block_size: int,
                      dtype: torch.dtype, device: str | None = None, sliding_window: int | None = None) -> Any:
        """The backend as the engine builds it (`select`), or a skip with `reasons()` (its `check()`)."""
        cls = self.backend_cls
        spec = AttentionSpec(device or self.device, dtype, head_size, num_heads, num_kv_heads, block_size,
                             sliding_window)
        reasons = cls.reasons(spec)
        if reasons:
            pytest.skip(f"{self.backend}: {'; '.join(reasons)}")
        candidates = {name: component("attention", name) for name in registry().names("attention")}
        return cls.select(cls.Options(**self.options), spec, candidates)

    def to_backend_cache(self, backend: Any, cache: torch.Tensor) -> torch.Tensor:
        """A copy of `cache` (default layout) in the backend's `kv_cache_shape`."""
        _, num_blocks, block_size, num_kv_heads, head_size = cache.shape
        shape = tuple(backend.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size))
        if shape != tuple(cache.shape):
            pytest.skip(f"{self.backend}: kv_cache_shape {shape} is not the default layout; override "
                        f"to_backend_cache / from_backend_cache to convert")
        return cache.clone()

    def from_backend_cache(self, backend: Any, cache: torch.Tensor) -> torch.Tensor:
        """The backend's cache back in the default layout (inverse of `to_backend_cache`)."""
        return cache

    def run(self, backend: Any, b: AttentionBatch, layers: int = 1, sliding_window: int | None = None,
            meta: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Build the metadata once (or take `meta`), run `layers` layers on it (as the runner does), return the last
        output and cache in the default layout."""
        if meta is None:
            meta = backend.make_builder(torch.device(self.device)).build(b.meta)
        for _ in range(layers):
            impl = make_layer_impl(backend, b.num_heads, b.num_kv_heads, b.head_size, sliding_window)
            cache = self.to_backend_cache(backend, b.kv_cache)
            out = impl.forward(b.q, b.k, b.v, cache, meta)
            assert out.shape == b.q.shape and out.dtype == b.q.dtype, (out.shape, out.dtype)
        return out, self.from_backend_cache(backend, cache)

    def check_against_reference(self, backend: Any, b: AttentionBatch, dtype: torch.dtype,
                                layers: int = 1, sliding_window: int | None = None, meta: Any = None) -> None:
        ref, ref_cache = reference_output(b, sliding_window)
        out, cache = self.run(backend, b, layers, sliding_window, meta)
        n = b.meta.num_actual_tokens
        assert torch.equal(cache, ref_cache), "new K/V were not written exactly at slot_mapping"
        err = rel_err(out[:n], ref)
        assert err <= TOL[dtype], f"relative error {err:.2e} > {TOL[dtype]:.0e}"
        assert torch.isfinite(out[n:]).all(), "padded rows must be finite"

    # -- the contract ------------------------------------------------------------------------------------------
    def test_registered_shape(self):
        cls = self.backend_cls
        assert cls.name == self.backend
        assert cls.description and "\n" not in cls.description
        assert cls.Options.model_config.get("extra") == "forbid"
        assert isinstance(cls.priority, int) and isinstance(cls.graph_safe, bool)
        reasons = cls.check(AttentionSpec(self.device, torch.float32, 64, 8, 2, 16))
        assert isinstance(reasons, list) and all(isinstance(r, str) and r for r in reasons)

    @pytest.mark.parametrize("num_blocks,block_size,num_kv_heads,head_size", [(7, 16, 2, 64), (1, 1, 1, 8)])
    def test_kv_cache_shape_holds_every_slot(self, num_blocks, block_size, num_kv_heads, head_size):
        """The runner sizes the KV pool from `kv_cache_shape`: it holds K and V for every slot, no more."""
        backend = self.backend_cls(self.backend_cls.Options(**self.options))
        shape = backend.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size)
        assert all(isinstance(d, int) and d > 0 for d in shape), shape
        assert torch.Size(shape).numel() == 2 * num_blocks * block_size * num_kv_heads * head_size

    @pytest.mark.parametrize("block_size", [16, 32])
    @pytest.mark.parametrize("gqa", [1, 4, 8])
    @pytest.mark.parametrize("head_size", [64, 128])
    def test_mixed_prefill_and_decode(self, head_size, gqa, block_size):
        backend = self.build_backend(2 * gqa, 2, head_size, block_size, torch.float32)
        b = make_batch(*MIXED, num_heads=2 * gqa, num_kv_heads=2, head_size=head_size, block_size=block_size,
                       device=self.device, seed=head_size + gqa + block_size)
        self.check_against_reference(backend, b, torch.float32)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half_precision(self, dtype):
        backend = self.build_backend(8, 2, 64, 16, dtype)
        b = make_batch(*MIXED, num_heads=8, num_kv_heads=2, head_size=64, block_size=16, dtype=dtype,
                       device=self.device, seed=11)
        self.check_against_reference(backend, b, dtype)

    def test_metadata_shared_by_layers(self):
        """The runner builds metadata once per step and hands it to every layer."""
        backend = self.build_backend(4, 2, 64, 16, torch.float32)
        b = make_batch(*MIXED, num_heads=4, num_kv_heads=2, head_size=64, block_size=16, device=self.device,
                       seed=21)
        self.check_against_reference(backend, b, torch.float32, layers=3)

    def test_prefill_only_and_decode_only(self):
        for query_lens, context_lens in (([7, 1, 33], [0, 0, 0]), ([1, 1, 1, 1], [1, 16, 17, 95])):
            backend = self.build_backend(4, 4, 64, 16, torch.float32)
            b = make_batch(query_lens, context_lens, num_heads=4, num_kv_heads=4, head_size=64, block_size=16,
                           device=self.device, seed=len(query_lens))
            self.check_against_reference(backend, b, torch.float32)

    def test_decode_only_with_graph_padding(self):
        """A padded decode batch as CUDA graphs run it: extra rows with slot -1 must not touch the cache."""
        if not self.backend_cls.graph_safe:
            pytest.skip(f"{self.backend} is not graph-safe, so it never sees padded rows")
        backend = self.build_backend(8, 2, 64, 16, torch.float32)
        b = make_batch([1] * 4, [150, 0, 33, 64], num_heads=8, num_kv_heads=2, head_size=64, block_size=16,
                       device=self.device, pad_tokens=3, seed=1)
        self.check_against_reference(backend, b, torch.float32)

    # -- fp8 KV cache --------------------------------------------------------------------------------------------
    def test_fp8_kv_cache(self):
        """`AttentionSpec.kv_cache_dtype` float8_e4m3fn with `impl.k_scale` 0.05 / `impl.v_scale` 0.02: the new K/V are
        stored as `weavelm.ops.kv_quant.quantize_kv` stores them (saturate(k / k_scale), byte-exact) and the output
        equals the reference on the dequantized cache. A backend that refuses fp8 (its `check`, or no
        `checks_kv_cache_dtype`) is skipped with its reasons."""
        from weavelm.errors import PluginError
        from weavelm.ops.cache_write import write_kv_cache
        from weavelm.ops.kv_quant import dequantize_kv, quantize_kv
        from weavelm.ops.reference_attention import paged_attention_ref

        fp8, k_scale, v_scale = torch.float8_e4m3fn, 0.05, 0.02
        cls = self.backend_cls
        spec = AttentionSpec(self.device, torch.float32, 64, 8, 2, 16, kv_cache_dtype=fp8)
        reasons = cls.reasons(spec)
        if reasons:
            assert all(isinstance(r, str) and r for r in reasons)
            pytest.skip(f"{self.backend}: {'; '.join(reasons)}")
        candidates = {name: component("attention", name) for name in registry().names("attention")}
        try:
            backend = cls.select(cls.Options(**self.options), spec, candidates)
        except PluginError as e:  # `auto` found no candidate that stores fp8 here
            pytest.skip(f"{self.backend}: {e}")
        b = make_batch(*MIXED, num_heads=8, num_kv_heads=2, head_size=64, block_size=16, device=self.device,
                       pad_tokens=3 if cls.graph_safe else 0, seed=31)
        want = torch.stack([quantize_kv(b.kv_cache[0], k_scale, fp8), quantize_kv(b.kv_cache[1], v_scale, fp8)])
        impl = make_layer_impl(backend, 8, 2, 64, None)
        impl.k_scale, impl.v_scale = k_scale, v_scale
        cache = self.to_backend_cache(backend, want)
        out = impl.forward(b.q, b.k, b.v, cache, backend.make_builder(torch.device(self.device)).build(b.meta))
        cache = self.from_backend_cache(backend, cache)
        n = b.meta.num_actual_tokens
        write_kv_cache(b.k[:n].view(n, 2, 64), b.v[:n].view(n, 2, 64), want, b.meta.slot_mapping[:n], k_scale,
                       v_scale)
        assert cache.dtype == fp8 and torch.equal(cache.view(torch.uint8), want.view(torch.uint8)), \
            "new K/V were not stored as quantize_kv stores them, at slot_mapping"
        dense = torch.stack([dequantize_kv(want[0], k_scale, torch.float32),
                             dequantize_kv(want[1], v_scale, torch.float32)])
        ref = paged_attention_ref(b.q[:n].view(n, 8, 64), dense, b.meta, b.scale).reshape(n, -1)
        err = rel_err(out[:n], ref)
        assert err <= TOL[torch.float32], f"relative error {err:.2e} > {TOL[torch.float32]:.0e}"
        assert torch.isfinite(out[n:]).all(), "padded rows must be finite"

    # -- sliding windows -----------------------------------------------------------------------------------------
    def windowed_batch(self, query_lens, context_lens, window: int, gqa: int = 4, dtype=torch.float32,
                       seed: int = 0) -> AttentionBatch:
        b = make_batch(query_lens, context_lens, num_heads=2 * gqa, num_kv_heads=2, head_size=64, block_size=16,
                       dtype=dtype, device=self.device, seed=seed)
        freed = blocks_outside_window(b, window)
        b.kv_cache[:, freed] = FREED_FILL
        return b

    @pytest.mark.parametrize("window,gqa", [(1, 1), (8, 4), (37, 4)])
    def test_sliding_window(self, window, gqa):
        backend = self.build_backend(2 * gqa, 2, 64, 16, torch.float32, sliding_window=window)
        b = self.windowed_batch(*WINDOWED, window, gqa, seed=window + gqa)
        self.check_against_reference(backend, b, torch.float32, sliding_window=window)

    @pytest.mark.parametrize("query_lens,context_lens", [([1] * 4, [150, 3, 33, 64]),
                                                         ([1, 5, 17, 3], [150, 40, 60, 0])],
                             ids=["decode", "short_chunks"])
    def test_sliding_window_short_queries(self, query_lens, context_lens):
        """Decodes and short chunks (the shapes CPU backends often run through another kernel than prefill)."""
        backend = self.build_backend(8, 2, 64, 16, torch.float32, sliding_window=20)
        b = self.windowed_batch(query_lens, context_lens, 20, seed=3)
        self.check_against_reference(backend, b, torch.float32, sliding_window=20)

    def test_sliding_window_half_precision(self):
        backend = self.build_backend(8, 2, 64, 16, torch.float16, sliding_window=8)
        b = self.windowed_batch(*WINDOWED, 8, dtype=torch.float16, seed=5)
        self.check_against_reference(backend, b, torch.float16, sliding_window=8)

    def test_windowed_and_full_layers_share_metadata(self):
        """Gemma 3 / Qwen2 interleave windowed and full layers over one step's metadata."""
        backend = self.build_backend(8, 2, 64, 16, torch.float32, sliding_window=8)
        for query_lens, context_lens in (WINDOWED, ([1] * 3, [150, 3, 64])):
            b = make_batch(query_lens, context_lens, num_heads=8, num_kv_heads=2, head_size=64, block_size=16,
                           device=self.device, seed=len(query_lens))
            meta = backend.make_builder(torch.device(self.device)).build(b.meta)
            for window in (8, None, 24):
                self.check_against_reference(backend, b, torch.float32, sliding_window=window, meta=meta)

    # -- on the GPU: long contexts, bf16, head 256, CUDA graphs ------------------------------------------------
    @pytest.mark.gpu
    @pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
    def test_long_context_sliding_window_gpu(self):
        backend = self.build_backend(32, 8, 128, 16, torch.bfloat16, device="cuda", sliding_window=1000)
        b = make_batch(*LONG, num_heads=32, num_kv_heads=8, head_size=128, block_size=16, dtype=torch.bfloat16,
                       device="cuda", seed=9)
        b.kv_cache[:, blocks_outside_window(b, 1000)] = FREED_FILL
        self.check_against_reference(backend, b, torch.bfloat16, sliding_window=1000)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    @pytest.mark.parametrize("head_size,gqa", [(64, 8), (128, 4), (128, 1), (256, 2)])
    @pytest.mark.gpu
    @pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
    def test_long_context_gpu(self, head_size, gqa, dtype):
        backend = self.build_backend(4 * gqa, 4, head_size, 16, dtype, device="cuda")
        b = make_batch(*LONG, num_heads=4 * gqa, num_kv_heads=4, head_size=head_size, block_size=16, dtype=dtype,
                       device="cuda", seed=head_size * gqa)
        self.check_against_reference(backend, b, dtype)

    @pytest.mark.gpu
    @pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
    def test_long_decode_only_gpu(self):
        backend = self.build_backend(32, 8, 128, 16, torch.bfloat16, device="cuda")
        b = make_batch([1] * 5, [8191, 6000, 1, 4095, 300], num_heads=32, num_kv_heads=8, head_size=128,
                       block_size=16, dtype=torch.bfloat16, device="cuda", seed=5)
        self.check_against_reference(backend, b, torch.bfloat16)

    @pytest.mark.gpu
    @pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
    def test_cuda_graph_replay_gpu(self):
        """Capture a padded decode batch, refill its static buffers with another batch, replay, compare."""
        if not self.backend_cls.graph_safe:
            pytest.skip(f"{self.backend} is not graph-safe")
        dtype = torch.bfloat16
        backend = self.build_backend(16, 4, 128, 16, dtype, device="cuda")
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
        q, k, v = b.q.clone().zero_(), b.k.clone(), b.v.clone()
        cache = self.to_backend_cache(backend, b.kv_cache)
        impl.forward(q, k, v, cache, meta)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = impl.forward(q, k, v, cache, meta)
        for f, t in static.items():
            t.copy_(getattr(m, f))
        q.copy_(b.q)
        cache.copy_(self.to_backend_cache(backend, b.kv_cache))
        graph.replay()
        torch.cuda.synchronize()
        n = m.num_actual_tokens
        assert torch.equal(self.from_backend_cache(backend, cache), ref_cache)
        assert rel_err(out[:n], ref) <= TOL[dtype]
        assert torch.isfinite(out).all()
