"""weavelm's native CPU kernels (weavelm/ops/native): each against its torch reference, and the whole-stack call
against the per-layer path (bit for bit: the same kernels in the same order).

Tolerances: the quantized GEMMs multiply llama.cpp's exact block values in fp32, so they match a dense fp32 GEMM on
the dequantized weight up to rounding order (1e-5 relative); the elementwise kernels match torch to a few ulps
(their exp is a polynomial, about 1 ulp)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.gguf_fixtures import model_zoo
from tests.test_quantization import random_blocks
from weavelm.ops import native
from weavelm.ops.quant_kernels import BlockQ4Pack, BlockQ8Pack
from weavelm.plugins.quantization.gguf_blocks import decode_int4_dm, decode_q8_0, dequantize

pytestmark = pytest.mark.skipif(not native.available(), reason=str(native.unavailable_reason()))


def q8_0_blocks(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // 32, 34), dtype=np.uint8)
    raw[..., :2] = rng.uniform(-0.02, 0.02, size=(rows, cols // 32, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("rows", [72, 37])  # 37: an odd last output feature, which the pair kernels pair with itself
@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q4_1", "Q4_K", "Q8_0"])
def test_block_packs_hold_llama_cpp_values_and_multiply_in_fp32(ggml_type, rows):
    cols = 512
    if ggml_type == "Q8_0":
        raw = q8_0_blocks(rows, cols)
        pack = BlockQ8Pack.from_codes(*decode_q8_0(raw))
    else:
        raw = random_blocks(ggml_type, rows, cols, seed=3)
        pack = BlockQ4Pack.from_codes(*decode_int4_dm(ggml_type, raw))
    ref = dequantize(ggml_type, raw, cols)
    w = pack.dequantize()
    # the 4-bit kernels fuse d * q + m into one multiply-add: within half an ulp of gguf's two roundings
    torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(rows, generator=g)

    def close(got, x, extra=0):
        # rounding order only: bounded by a few ulps of the sum of |x| |w| (outputs can cancel to far less)
        atol = 1e-6 * (x.abs() @ w.abs().t()).max().item()
        torch.testing.assert_close(got, x @ w.t() + extra, rtol=1e-5, atol=atol)

    for m in (1, 2, 3, 8, 9, 17, 32):
        x = torch.randn(m, cols, generator=g)
        close(pack.mm(x), x)
        close(pack.mm(x, bias), x, bias)
    wide = torch.randn(5, cols + 64, generator=g)[:, 32:32 + cols]  # rows with a stride: no copy needed
    close(pack.mm(wide), wide)
    x = torch.randn(40, cols, generator=g)  # past NATIVE_MAX_ROWS: dequantize + torch GEMM
    close(pack.mm(x), x)


def test_elementwise_kernels_match_the_torch_layers():
    from weavelm.layers import RMSNorm, RotaryEmbedding, SiluAndMul

    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(96, eps=1e-5)
    norm.weight.data = torch.randn(96, generator=g)
    x, res = torch.randn(7, 96, generator=g), torch.randn(7, 96, generator=g)
    act = SiluAndMul()
    up = torch.randn(7, 2 * 80, generator=g) * 4

    class Cfg:
        rope_theta = 10000.0
        max_position_embeddings = 64

    rot = RotaryEmbedding(Cfg(), 32, 64)
    qkv = torch.randn(5, (4 + 2 * 2) * 32, generator=g)
    pos = torch.tensor([0, 3, 9, 40, 63])
    got_n, (got_rn, got_rs), got_a = norm(x), norm(x, res), act(up)
    inplace = qkv.clone()
    assert rot.forward_inplace(pos, inplace, 4, 2)
    with native.disabled():
        ref_n, (ref_rn, ref_rs), ref_a = norm(x), norm(x, res), act(up)
        q, k = rot(pos, qkv[:, :128].reshape(5, 4, 32), qkv[:, 128:192].reshape(5, 2, 32))
        assert not rot.forward_inplace(pos, qkv.clone(), 4, 2)
    torch.testing.assert_close(got_n, ref_n, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_rn, ref_rn, rtol=1e-6, atol=1e-6)
    assert torch.equal(got_rs, ref_rs)
    torch.testing.assert_close(got_a, ref_a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(inplace[:, :128], q.reshape(5, 128), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(inplace[:, 128:192], k.reshape(5, 64), rtol=1e-6, atol=1e-6)
    assert torch.equal(inplace[:, 192:], qkv[:, 192:])  # v untouched


@pytest.mark.parametrize("arch,source", [("llama", "gguf_Q4_K"), ("qwen2", "gguf_Q4_K"), ("qwen3", "gguf_Q4_K"),
                                         ("llama", "int8")])
def test_whole_stack_call_equals_the_per_layer_path(arch, source, one_torch_thread):
    """Same weights (a GGUF Q4_K file, or safetensors quantized by `int8` on load), same engine settings: the
    whole-stack native call (decode steps) against the per-layer path (`kernels: {native_stack: false}`): identical
    logits, bit for bit, in a mixed batch (prefill past the stack's token limit, then decode)."""
    from weavelm import LLM, SamplingParams

    zoo = model_zoo(arch)
    path, extra = (zoo["safetensors"], {"quantization": "int8"}) if source == "int8" else (zoo[source], {})
    prompts = [[5, 17, 42, 99, 3, 250] * 12, [7, 7, 1, 300, 12], [400, 2, 9]]
    results = []
    for on in (True, False):
        llm = LLM(model=path, device="cpu", dtype="float32", cache={"num_blocks": 64},
                  kernels={"native_stack": on}, **extra)
        captured = []
        llm.collective_rpc("set_logits_hook", (lambda ids, logits: captured.append(logits.clone()) or None,))
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        [stack] = llm.collective_rpc("apply_model", (lambda model: model.__dict__.get("_native_stack"),))
        assert bool(stack) == on, stack
        results.append(([o.outputs[0].token_ids for o in outs], captured))
    (tok_a, log_a), (tok_b, log_b) = results
    assert tok_a == tok_b
    assert len(log_a) == len(log_b) and all(torch.equal(a, b) for a, b in zip(log_a, log_b))


def test_a_failed_build_falls_back_to_torch_with_a_reason(tmp_path):
    """No working compiler (CC points at `false`): the library is not built, `unavailable_reason` says why, and the
    engine still runs the GGUF default on torch's kernels. In a fresh process, so this one's library is untouched."""
    import os
    import subprocess
    import sys

    code = ("from weavelm.ops import native\n"
            "assert not native.available(), 'built with a failing compiler'\n"
            "print(native.unavailable_reason())\n"
            "from weavelm.ops.quant_kernels import BlockQ4Pack\n"
            "import numpy as np, torch\n"
            "p = BlockQ4Pack.from_codes(np.ones((4, 64), np.uint8), np.ones((4, 2), np.float32),"
            " np.zeros((4, 2), np.float32))\n"
            "assert torch.equal(p.mm(torch.ones(1, 64)), torch.full((1, 4), 64.0))\n")
    env = {**os.environ, "CC": "false", "WEAVELM_CACHE_ROOT": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "native CPU kernels unavailable: false failed" in out.stdout, out.stdout


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32), (16, 2, 48)])
def test_paged_attention_matches_sdpa_over_split_contexts(heads, kv_heads, head_dim):
    """Requests with 1, 5 and 32 new tokens over contexts of 3 to 700 keys (several 128-key chunks, merged), on a
    shuffled block table, through the split (flash-decoding) kernel, GQA groups 3, 1 and 8. Reference: SDPA per
    request with a causal mask."""
    g = torch.Generator().manual_seed(2)
    bs, nblocks = 16, 128
    cache = torch.randn(2, nblocks, bs, kv_heads, head_dim, generator=g)
    q_lens, ctxs = [1, 5, 32, 1], [3, 130, 700, 257]
    perm = torch.randperm(nblocks, generator=g).to(torch.int32)
    need = [(c + bs - 1) // bs for c in ctxs]
    table = torch.zeros(len(ctxs), max(need), dtype=torch.int32)
    start = 0
    for r, nb in enumerate(need):
        table[r, :nb] = perm[start:start + nb]
        start += nb
    t = sum(q_lens)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(t, width, generator=g)
    q, k, v = qkv[:, :heads * head_dim], qkv[:, heads * head_dim:(heads + kv_heads) * head_dim], \
        qkv[:, (heads + kv_heads) * head_dim:]
    slots, qsl = [], [0]
    for r, (ql, c) in enumerate(zip(q_lens, ctxs)):
        for pos in range(c - ql, c):
            slots.append(int(table[r, pos // bs]) * bs + pos % bs)
        qsl.append(qsl[-1] + ql)
    scale = head_dim ** -0.5
    ref_cache = cache.clone()
    out = native.paged_attention(q, k, v, cache, torch.tensor(slots), torch.tensor(qsl, dtype=torch.int32),
                                 torch.tensor(ctxs, dtype=torch.int32), table, len(ctxs), heads, kv_heads, head_dim,
                                 scale)
    flat = ref_cache.view(2, -1, kv_heads, head_dim)
    flat[0][torch.tensor(slots)] = k.reshape(t, kv_heads, head_dim)
    flat[1][torch.tensor(slots)] = v.reshape(t, kv_heads, head_dim)
    assert torch.equal(cache, ref_cache)  # the new keys and values were written where slot_mapping says
    for r, (ql, c) in enumerate(zip(q_lens, ctxs)):
        idx = (table[r].long()[:, None] * bs + torch.arange(bs)).reshape(-1)[:c]
        keys, values = flat[0][idx].transpose(0, 1), flat[1][idx].transpose(0, 1)  # (kvh, c, d)
        qr = q[qsl[r]:qsl[r + 1]].reshape(ql, heads, head_dim).transpose(0, 1)
        mask = torch.arange(c)[None, :] <= (c - ql + torch.arange(ql))[:, None]
        ref = torch.nn.functional.scaled_dot_product_attention(
            qr[None], keys[None], values[None], attn_mask=mask, scale=scale, enable_gqa=heads != kv_heads)[0]
        got = out[qsl[r]:qsl[r + 1]].reshape(ql, heads, head_dim).transpose(0, 1)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(6, 2, 40), (32, 2, 64)])
def test_shapes_the_kernel_does_not_take_go_to_sdpa(heads, kv_heads, head_dim):
    """A head size that is not a multiple of 16, or more than 8 query heads per kv head: the `cpu` backend runs
    the step through SDPA instead, with the same result as the reference."""
    from weavelm.plugins.attention.cpu import CpuAttentionBackend
    from weavelm.testing._attention_batches import make_batch, reference_output, rel_err

    assert not native.attention_supported(heads, kv_heads, head_dim)
    backend = CpuAttentionBackend(CpuAttentionBackend.Options())
    b = make_batch([1, 1, 1], [3, 130, 257], num_heads=heads, num_kv_heads=kv_heads, head_size=head_dim,
                   block_size=16, device="cpu", seed=5)
    ref, ref_cache = reference_output(b)
    meta = backend.make_builder(torch.device("cpu")).build(b.meta)
    assert meta.common is not None  # a short-query step: the builder left the choice to the layer
    cache = b.kv_cache.clone()
    out = backend.make_impl(heads, kv_heads, head_dim, b.scale).forward(b.q, b.k, b.v, cache, meta)
    n = b.meta.num_actual_tokens
    assert torch.equal(cache, ref_cache)
    assert rel_err(out[:n], ref) <= 1e-5
