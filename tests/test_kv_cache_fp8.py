"""Issue 28, item 2 (and item 5's KV stats): the fp8 KV cache (`cache.kv_cache_dtype`, vLLM's `kv_cache_dtype`).

- the option at every door: YAML/`LLM(...)`, vLLM's keyword argument and `EngineArgs` flag, `--kv-cache-dtype`;
- one byte per element: at the same `cpu_kv_cache_gib` the pool holds 4x the blocks of an fp32 engine and 2x those
  of a bf16 engine, and `get_stats()` shows the block count, the bytes per block and the storage dtype;
- every built-in attention backend either stores fp8 (written `saturate(k / k_scale)`, byte-exact with torch's
  rounding; attention equal to the reference on the dequantized cache) or refuses it in `check()` with a reason;
- the default model: fp8 KV against the unquantized cache (the full 16 x 32 measurement is
  benchmarks/kv_fp8_agreement.py).
"""

from __future__ import annotations

import argparse
import gc

import pytest
import torch

from weavelm import LLM, ConfigError, SamplingParams
from weavelm.core.compat import apply_vllm_aliases
from weavelm.core.forward import AttentionSpec, make_layer_impl
from weavelm.core.interfaces import AttentionBackend
from weavelm.core.registry import Registry
from weavelm.core.vllm_args import EngineArgs
from weavelm.ops.cache_write import write_kv_cache
from weavelm.ops.kv_quant import dequantize_kv, quantize_kv
from weavelm.ops.reference_attention import paged_attention_ref
from weavelm.testing import component, make_batch, rel_err
from weavelm.testing.attention import triton_interpreter_without_cuda

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
KERNELS = "weavelm.plugins.attention.triton.kernels"
FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
SMALL = ([5, 1, 9, 1], [11, 30, 0, 17])  # query / cached lengths: prefill chunks on cached prefixes, decodes
KV_GIB = 0.01
GIB = 1 << 30


@pytest.fixture(scope="module")
def registry():
    return Registry.load()


# -- the option ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["auto", "fp8", "fp8_e4m3", "fp8_e5m2"])
def test_vllm_names_are_accepted_everywhere(registry, value):
    from weavelm.core.config import EngineConfig

    assert EngineConfig.build({"cache": {"kv_cache_dtype": value}}, registry).cache.kv_cache_dtype == value
    assert apply_vllm_aliases({"kv_cache_dtype": value}, registry) == {"cache": {"kv_cache_dtype": value}}
    args = EngineArgs.add_cli_args(argparse.ArgumentParser()).parse_args(["--kv-cache-dtype", value])
    assert vars(EngineArgs.from_cli_args(args)) == {"model": None, "kv_cache_dtype": value}


def test_cli_flag_sets_the_cache_option():
    from weavelm.cli import build_parser, engine_config_from_args

    args = build_parser().parse_args(["generate", "--kv-cache-dtype", "fp8", "--set", "cache.block_size=32"])
    config = engine_config_from_args(args)
    assert (config.cache.kv_cache_dtype, config.cache.block_size) == ("fp8", 32)


def test_unsupported_values_are_refused_with_the_choices(registry):
    from weavelm.core.config import EngineConfig

    with pytest.raises(ConfigError) as e:
        apply_vllm_aliases({"kv_cache_dtype": "fp8_inc"}, registry)
    assert "kv_cache_dtype: 'fp8_inc' is unsupported" in str(e.value) and "fp8_e4m3" in str(e.value)
    with pytest.raises(ConfigError) as e:
        EngineConfig.build({"cache": {"kv_cache_dtype": "int8"}}, registry)
    assert "cache.kv_cache_dtype" in str(e.value) and "'fp8_e5m2'" in str(e.value)
    with pytest.raises(ConfigError, match="given as 'fp8' but cache.kv_cache_dtype is 'auto'"):
        apply_vllm_aliases({"kv_cache_dtype": "fp8", "cache": {"kv_cache_dtype": "auto"}}, registry)


# -- memory: the block count at the same budget ----------------------------------------------------------------

@pytest.fixture(scope="module")
def pool_stats(tiny_llama):
    """get_stats() and greedy tokens of the tiny llama per (dtype, kv_cache_dtype), same cpu_kv_cache_gib."""
    out = {}
    for dtype, kv in [("float32", "auto"), ("float32", "fp8"), ("bfloat16", "auto")]:
        llm = LLM(model=tiny_llama, device="cpu", dtype=dtype, kv_cache_dtype=kv, attention="cpu",
                  cache={"cpu_kv_cache_gib": KV_GIB})
        gen = llm.generate([{"prompt_token_ids": list(range(3, 40))}],
                           SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)
        out[dtype, kv] = (llm.get_stats(), gen[0].outputs[0].token_ids)
        llm.shutdown()
    return out


def test_fp8_quarters_fp32_blocks_and_halves_bf16_blocks(pool_stats):
    """Same 0.01 GiB: fp32 KV 4 bytes/element, bf16 2, fp8 1 (whatever the model's dtype). The tiny llama's block:
    2 layers x K,V x 16 tokens x 2 kv heads x 16 dims = 2048 elements. Blocks are floor(budget / block bytes), so
    fp8 holds 4x (2x) the fp32 (bf16) blocks up to the rounding of that floor."""
    budget = int(KV_GIB * GIB)
    f32, f8 = pool_stats["float32", "auto"][0], pool_stats["float32", "fp8"][0]
    b16 = pool_stats["bfloat16", "auto"][0]
    assert (f32.kv_block_bytes, b16.kv_block_bytes, f8.kv_block_bytes) == (4 * 2048, 2 * 2048, 2048)
    assert (f32.kv_cache_dtype, b16.kv_cache_dtype, f8.kv_cache_dtype) == ("float32", "bfloat16", "float8_e4m3fn")
    for stats in (f32, b16, f8):
        assert stats.num_total_blocks == budget // stats.kv_block_bytes
    assert 4 * f32.num_total_blocks <= f8.num_total_blocks < 4 * (f32.num_total_blocks + 1)
    assert 2 * b16.num_total_blocks <= f8.num_total_blocks < 2 * (b16.num_total_blocks + 1)
    assert all(len(toks) == 4 for _, toks in pool_stats.values())


def test_metrics_show_block_bytes():
    from weavelm.core.llm_engine import EngineStats
    from weavelm.serve.metrics import ServerMetrics

    metrics = ServerMetrics("m")
    metrics.set_stats(EngineStats(0, 0, 0, 5242, 0.0, 0.0, kv_cache_dtype="float8_e4m3fn", kv_block_bytes=2048))
    text = metrics.render().decode()
    assert 'weavelm:kv_cache_block_bytes{model_name="m"} 2048.0' in text
    assert 'weavelm:kv_cache_total_blocks{model_name="m"} 5242.0' in text


# -- attention backends ----------------------------------------------------------------------------------------

def _fp8_cache(cache: torch.Tensor, k_scale: float, v_scale: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.stack([quantize_kv(cache[0], k_scale, dtype), quantize_kv(cache[1], v_scale, dtype)])


@pytest.mark.parametrize("fp8,name,splits", [(f, n, 0) for f in sorted(FP8) for n in ("torch_ref", "cpu", "triton")]
                         + [("e4m3", "triton", 4)])
def test_backend_attends_over_the_dequantized_cache(name, fp8, splits):
    """A mixed batch (prefill chunks, one on a cached prefix, and decodes), k_scale 0.05, v_scale 0.02: the new K/V land
    byte-exact as torch's `quantize_kv`, and the output equals the reference on the dequantized cache (fp32).
    `splits` 4: a decode-only batch through Triton's split-KV path (its partials carry v_scale)."""
    dtype, heads, kv_heads, head = FP8[fp8], 4, 2, 32
    cls = component("attention", name)
    spec = AttentionSpec(DEVICE, torch.float32, head, heads, kv_heads, 16, kv_cache_dtype=dtype)
    lens = SMALL if not splits else ([1, 1, 1], [40, 70, 5])
    with triton_interpreter_without_cuda((KERNELS,)):
        assert cls.reasons(spec) == []
        backend = cls(cls.Options(num_splits=splits) if splits else cls.Options())
        b = make_batch(*lens, num_heads=heads, num_kv_heads=kv_heads, head_size=head, block_size=16,
                       device=DEVICE, pad_tokens=2 if name == "triton" else 0, seed=len(fp8))
        k_scale, v_scale = 0.05, 0.02
        cache = _fp8_cache(b.kv_cache, k_scale, v_scale, dtype)
        impl = make_layer_impl(backend, heads, kv_heads, head, None)
        impl.k_scale, impl.v_scale = k_scale, v_scale
        out = impl.forward(b.q, b.k, b.v, cache, backend.make_builder(torch.device(DEVICE)).build(b.meta))
    n = b.meta.num_actual_tokens
    want = _fp8_cache(b.kv_cache, k_scale, v_scale, dtype)
    write_kv_cache(b.k[:n].view(n, kv_heads, head), b.v[:n].view(n, kv_heads, head), want, b.meta.slot_mapping[:n],
                   k_scale, v_scale)
    assert torch.equal(cache.view(torch.uint8), want.view(torch.uint8))
    dense = torch.stack([dequantize_kv(cache[0], k_scale, torch.float32),
                         dequantize_kv(cache[1], v_scale, torch.float32)])
    ref = paged_attention_ref(b.q[:n].view(n, heads, head), dense, b.meta, b.scale).reshape(n, -1)
    assert rel_err(out[:n], ref) <= 1e-5
    assert torch.isfinite(out).all()


def test_flash_attn_refuses_fp8_with_a_reason():
    spec = AttentionSpec("cuda", torch.bfloat16, 64, 8, 2, 16, kv_cache_dtype=torch.float8_e4m3fn)
    reasons = component("attention", "flash_attn").check(spec)
    assert any("kv_cache_dtype torch.float8_e4m3fn" in r and "attention: triton" in r for r in reasons), reasons


def test_a_backend_that_does_not_check_the_cache_dtype_is_refused_fp8():
    class Plain(AttentionBackend):  # a third-party backend written before kv_cache_dtype existed
        name = "plain"

        def make_impl(self, num_heads, num_kv_heads, head_size, scale, sliding_window=None):
            raise AssertionError("never built")

    fp8 = AttentionSpec("cpu", torch.float32, 64, 8, 2, 16, kv_cache_dtype=torch.float8_e4m3fn)
    assert Plain.reasons(fp8) == ["kv_cache_dtype torch.float8_e4m3fn: this backend keeps the KV cache in the "
                                  "model's dtype only"]
    assert Plain.reasons(AttentionSpec("cpu", torch.float32, 64, 8, 2, 16)) == []


@pytest.mark.parametrize("name", ["torch_ref", "triton"])
def test_out_of_range_values_saturate(name):
    """vLLM's fp8 conversion saturates: |k / k_scale| > 448 is stored as +-448 (e4m3), never NaN."""
    k = torch.tensor([[[1000.0, -1000.0, 3.0, 0.001] * 4]], device=DEVICE)
    cache = torch.zeros(2, 1, 1, 1, 16, dtype=torch.float8_e4m3fn, device=DEVICE)
    slots = torch.zeros(1, dtype=torch.long, device=DEVICE)
    if name == "triton":
        from weavelm.ops.cache_write import reshape_and_cache
        with triton_interpreter_without_cuda(()):
            reshape_and_cache(k, k, cache[0], cache[1], slots, k_scale=2.0, v_scale=2.0)
    else:
        write_kv_cache(k, k, cache, slots, 2.0, 2.0)
    got = dequantize_kv(cache[0, 0, 0, 0].cpu(), 2.0, torch.float32)
    want = dequantize_kv(quantize_kv(k[0, 0].cpu(), 2.0, torch.float8_e4m3fn), 2.0, torch.float32)
    assert got[:3].tolist() == [896.0, -896.0, 3.0] and torch.equal(got, want)


# -- the default model -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_default_model_fp8_kv_agrees_with_the_fp32_cache(one_torch_thread):
    """The default model (SmolLM2-135M Q4_1 GGUF, fp32 on the CPU), 4 chat prompts x 32 greedy tokens, fp8 (e4m3,
    scale 1.0) KV cache vs the fp32 one. Per position, the fp8 engine's most likely token given the fp32 run's
    tokens before it (teacher forcing) must agree >= 90%; free-running outputs are reported (a flip at one near-tie
    changes everything after it). benchmarks/kv_fp8_agreement.py measures all 16 prompts (2026-12-07, CPU):
    teacher-forced 95.5%, free-running position-wise 50.8% (4/16 outputs identical) against the fp32 cache,
    and a bf16 cache (emulated the same way) 97.5% free-running."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from kv_fp8_agreement import CHAT_PROMPTS, agreement, chat_token_ids, top1_given

    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    runs = {}
    prompts = None
    for kv in ("auto", "fp8"):
        llm = LLM(device="cpu", kv_cache_dtype=kv, cache={"cpu_kv_cache_gib": 0.05})
        prompts = prompts or chat_token_ids(llm.get_tokenizer(), CHAT_PROMPTS[:4])
        outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        runs[kv] = (llm, outs)
    ref = runs["auto"][1]
    forced = top1_given(runs["fp8"][0], prompts, ref)
    forced_agreement = sum(a == b for f, r in zip(forced, ref) for a, b in zip(f, r)) / (32 * len(prompts))
    free = agreement(runs["fp8"][1], ref)
    print(f"teacher-forced {forced_agreement:.1%}, free-running {free}")
    assert all(len(f) == 32 for f in forced)
    assert forced_agreement >= 0.9, (forced_agreement, free)
    assert runs["fp8"][0].get_stats().kv_cache_dtype == "float8_e4m3fn"
    for llm, _ in runs.values():
        llm.shutdown()


# -- on the GPU (the lead runs these: pytest -m gpu tests/test_kv_cache_fp8.py) --------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("fp8", sorted(FP8))
@pytest.mark.parametrize("num_splits", [1, 4])
def test_triton_fp8_kv_bf16_on_gpu(fp8, num_splits):
    """bf16 queries over an fp8 cache on CUDA (the hardware fp8 conversion, no interpreter rounding): the write is
    byte-exact with torch's `quantize_kv`, the output within bf16 tolerance (1e-2) of the fp32 reference on the
    dequantized cache; `num_splits` 4 takes the split-KV decode path (its partials carry v_scale)."""
    from weavelm.testing.attention import LONG, MIXED, TOL

    dtype, heads, kv_heads, head = FP8[fp8], 16, 4, 128
    backend_cls = component("attention", "triton")
    spec = AttentionSpec("cuda", torch.bfloat16, head, heads, kv_heads, 16, kv_cache_dtype=dtype)
    assert backend_cls.reasons(spec) == []
    backend = backend_cls(backend_cls.Options(num_splits=num_splits))
    lens = MIXED if num_splits == 1 else ([1] * len(LONG[1]), LONG[1])
    b = make_batch(*lens, num_heads=heads, num_kv_heads=kv_heads, head_size=head, block_size=16,
                   dtype=torch.bfloat16, device="cuda", pad_tokens=3, seed=num_splits)
    k_scale, v_scale = 0.03, 0.01
    cache = _fp8_cache(b.kv_cache, k_scale, v_scale, dtype)
    impl = make_layer_impl(backend, heads, kv_heads, head, None)
    impl.k_scale, impl.v_scale = k_scale, v_scale
    out = impl.forward(b.q, b.k, b.v, cache, backend.make_builder(torch.device("cuda")).build(b.meta))
    n = b.meta.num_actual_tokens
    want = _fp8_cache(b.kv_cache, k_scale, v_scale, dtype)
    write_kv_cache(b.k[:n].view(n, kv_heads, head), b.v[:n].view(n, kv_heads, head), want, b.meta.slot_mapping[:n],
                   k_scale, v_scale)
    assert torch.equal(cache.view(torch.uint8), want.view(torch.uint8))
    dense = torch.stack([dequantize_kv(cache[0], k_scale, torch.float32),
                         dequantize_kv(cache[1], v_scale, torch.float32)])
    ref = paged_attention_ref(b.q[:n].float().view(n, heads, head), dense, b.meta, b.scale).reshape(n, -1)
    assert rel_err(out[:n], ref) <= TOL[torch.bfloat16]
    assert (out[n:] == 0).all()


@pytest.mark.gpu
def test_engine_on_gpu_doubles_blocks_and_auto_skips_flash_attn(tiny_llama):
    """bf16 engine on CUDA: fp8 KV halves the block bytes and (same gpu_memory_utilization) doubles the pool within
    2% (the profiled peak differs a little); `attention: auto` passes over flash_attn (it refuses fp8) to triton."""
    stats, backends = {}, {}
    for kv in ("auto", "fp8"):
        llm = LLM(model=tiny_llama, device="cuda", dtype="bfloat16", kv_cache_dtype=kv,
                  cache={"gpu_memory_utilization": 0.02})  # ~1.6 GB: the block pool stays under a million
        out = llm.generate([{"prompt_token_ids": list(range(3, 40))}],
                           SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 8
        stats[kv], backends[kv] = llm.get_stats(), llm.engine.client.model_info["attention"]
        llm.shutdown()
        del llm, out
        gc.collect()
        torch.cuda.empty_cache()
    assert stats["auto"].kv_block_bytes == 2 * stats["fp8"].kv_block_bytes
    assert abs(stats["fp8"].num_total_blocks / stats["auto"].num_total_blocks - 2) < 0.02
    assert backends["fp8"] == "triton" and stats["fp8"].kv_cache_dtype == "float8_e4m3fn"
