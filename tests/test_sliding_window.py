"""Sliding-window attention (issue 25 #1): Mistral and Qwen2 past their window equal transformers, and the KV
cache holds only the blocks a window can still see.

The references are transformers' eager attention on the same tiny random weights (window 8, prompts and
generations well past it). fp32 on the CPU: greedy tokens must be identical, last-position logits within 1e-4.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.model_fixtures import VOCAB
from weavelm import LLM, SamplingParams
from weavelm.testing import prompt_logits

WINDOW = 8
PROMPTS = [list(range(10, 40)), [5, 17, 42, 99, 3, 250, 77, 12, 400, 8, 61, 6], list(range(300, 321))]
MAX_TOKENS = 24


def _config(arch: str):
    from transformers import MistralConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  initializer_range=0.3, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2, sliding_window=WINDOW)
    if arch == "mistral":
        return MistralConfig(**common)
    # layer 0 attends to everything, layer 1 to its window: per-layer windows (config.layer_types)
    return Qwen2Config(use_sliding_window=True, max_window_layers=1, **common)


def _hf(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """arch -> (path, transformers model, greedy references per prompt)."""
    from transformers import AutoModelForCausalLM

    out = {}
    for seed, arch in enumerate(("mistral", "qwen2_mixed")):
        path = str(tmp_path_factory.mktemp(arch))
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(_config(arch), dtype=torch.float32).save_pretrained(path)
        hf = _hf(path)
        refs = []
        with torch.no_grad():
            for p in PROMPTS:
                gen = hf.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                  eos_token_id=None, pad_token_id=0, min_new_tokens=MAX_TOKENS)
                refs.append(gen[0, len(p):].tolist())
        out[arch] = (path, hf, refs)
    return out


def _llm(path: str, attention: str = "torch_ref", **kw) -> LLM:
    return LLM(model=path, dtype="float32", device="cpu", loader="safetensors", attention=attention, **kw)


GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def test_the_window_changes_the_answer(models):
    """The references differ from full attention on the same weights, so the parity below tests the window."""
    path, hf, refs = models["mistral"]
    hf.config.sliding_window = None
    try:
        full = hf.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=MAX_TOKENS, do_sample=False,
                           eos_token_id=None, pad_token_id=0, min_new_tokens=MAX_TOKENS)[0, len(PROMPTS[0]):]
    finally:
        hf.config.sliding_window = WINDOW
    assert full.tolist() != refs[0]


@pytest.mark.parametrize("arch", ["mistral", "qwen2_mixed"])
@pytest.mark.parametrize("attention", ["torch_ref", "cpu"])
def test_greedy_past_the_window_matches_transformers(models, arch, attention):
    path, _, refs = models[arch]
    llm = _llm(path, attention, scheduler={"max_num_batched_tokens": 16})  # chunked prefill across the window
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == refs


def test_triton_backend_past_the_window(models):
    """The Triton kernels (under the interpreter without CUDA) in the engine, on the per-layer Qwen2 windows."""
    from weavelm.testing.attention import triton_interpreter_without_cuda

    path, _, refs = models["qwen2_mixed"]
    kernels = ("weavelm.plugins.attention.triton.kernels", "weavelm.ops.triton_cache_write")
    with triton_interpreter_without_cuda(kernels):
        llm = _llm(path, "triton", scheduler={"max_num_batched_tokens": 16})
        out = llm.generate([{"prompt_token_ids": PROMPTS[1]}], GREEDY)[0]
    assert out.outputs[0].token_ids == refs[1]


@pytest.mark.parametrize("arch", ["mistral", "qwen2_mixed"])
def test_last_position_logits_match_transformers(models, arch):
    path, hf, _ = models[arch]
    llm = _llm(path, "cpu")
    for p in PROMPTS:
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0, -1].float()
        torch.testing.assert_close(prompt_logits(llm, p), ref, atol=1e-4, rtol=1e-4)


# -- KV blocks follow the window ------------------------------------------------------------------------------
LONG_TOKENS = 96
BLOCK = 4


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0, min_new_tokens=n)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("attention", ["torch_ref", "cpu"])
def test_long_generation_holds_only_the_window(models, attention):
    """Memory follows the window: one request never holds more than window / block_size + 2 blocks, and its
    output still equals transformers'."""
    path, hf, _ = models["mistral"]
    prompt = PROMPTS[0]
    llm = _llm(path, attention, cache={"block_size": BLOCK, "num_blocks": 64},
               scheduler={"max_num_batched_tokens": 8})
    engine = llm.engine
    assert engine.client.model_info["sliding_window"] == WINDOW
    engine.add_request({"prompt_token_ids": prompt},
                       SamplingParams(max_tokens=LONG_TOKENS, temperature=0.0, ignore_eos=True), request_id="r")
    held, tokens = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens = out.outputs[0].token_ids
        held.append(llm.get_stats().num_used_blocks)
    bound = WINDOW // BLOCK + 2
    assert max(held) <= bound, held
    assert (len(prompt) + LONG_TOKENS) // BLOCK > 3 * bound  # the context is far larger than what is held
    assert tokens == _hf_greedy(hf, prompt, LONG_TOKENS)


def test_full_attention_layer_keeps_every_block(models):
    """Qwen2 with one full-attention layer reads the whole context: nothing may be freed."""
    path, _, refs = models["qwen2_mixed"]
    llm = _llm(path, "cpu", cache={"block_size": BLOCK, "num_blocks": 64})
    assert llm.engine.client.model_info["sliding_window"] is None
    out = llm.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY)[0]
    assert out.outputs[0].token_ids == refs[0]


def test_prefix_caching_chunked_prefill_and_preemption(models):
    """Mixed batches with chunked prefill, prefix hits on blocks the window already freed, and preemption (each
    later request outranks the running ones, two seats): the outputs still equal transformers'."""
    path, hf, _ = models["mistral"]
    shared = list(range(50, 86))
    prompts = [shared + [7, 8, 9], shared + [300, 301], shared + [9], PROMPTS[1]]
    refs = [_hf_greedy(hf, p, 40) for p in prompts]
    llm = _llm(path, "cpu", cache={"block_size": BLOCK, "num_blocks": 24, "enable_prefix_caching": True},
               scheduler={"name": "priority", "max_num_seqs": 2, "max_num_batched_tokens": 12})
    engine = llm.engine
    results, preempted, steps = {}, 0, 0
    while engine.has_unfinished_requests() or len(results) < len(prompts):
        if steps in (0, 12, 13, 14):  # later ones join while the first decodes: its prompt left the window
            i = max(steps - 11, 0)
            params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, priority=len(prompts) - i)
            engine.add_request({"prompt_token_ids": prompts[i]}, params, request_id=str(i))
        for out in engine.step():
            if out.finished:
                results[int(out.request_id)] = out.outputs[0].token_ids
        preempted += engine.client.get_stats().num_preempted
        steps += 1
    assert [results[i] for i in range(len(prompts))] == refs
    stats = llm.get_stats()
    assert stats.prefix_cache_hit_rate > 0 and preempted > 0, (stats, preempted)
    assert stats.num_used_blocks == 0


def test_kv_manager_frees_blocks_behind_the_window():
    """Unit level: blocks wholly before the next token's window go back to the pool (still registered, so a later
    prefix hit revives them); one freed before it was registered ends the request's hash chain."""
    from tests.scheduler_utils import make_request
    from weavelm.core.kv_cache import KVCacheManager

    prompt = list(range(3, 33))
    kv = KVCacheManager(num_blocks=32, block_size=BLOCK, sliding_window=WINDOW)
    req = make_request("a", prompt)
    assert kv.allocate_slots(req, 30, kv.get_computed_blocks(req)) is not None
    req.num_computed_tokens = 30
    kv.cache_computed(req)  # 7 full blocks registered
    assert kv.allocate_slots(req, 1) == []  # position 30 sees 23..30: blocks 0..4 (positions 0..19) are freed
    assert kv.block_ids("a") == [b.block_id for b in kv.req_blocks["a"][5:]] and len(kv.req_blocks["a"]) == 8
    assert kv.stats().num_used_blocks == 3 and kv.stats().num_cached_blocks == 7
    kv.check_invariants()
    twin = make_request("b", prompt)
    hits = kv.get_computed_blocks(twin)
    assert hits.num_tokens == 28  # the freed blocks are still cached
    kv.free(req)
    kv.check_invariants()
    late = KVCacheManager(num_blocks=32, block_size=BLOCK, sliding_window=WINDOW)
    c = make_request("c", prompt)
    late.allocate_slots(c, 30, late.get_computed_blocks(c))
    c.num_computed_tokens = 30
    late.allocate_slots(c, 1)  # async scheduling: the window moved on before the step's blocks were registered
    late.cache_computed(c)
    assert late.stats().num_cached_blocks == 0 and late.chain_serial["c"] is None
    late.check_invariants()


def _windowed_program_run(ops, window: int, caching: bool, num_blocks: int, budget: int, scheduler: str) -> None:
    from weavelm.core.contexts import SchedulerContext
    from weavelm.testing._registry import component
    from weavelm.testing._scheduler_driver import Driver, FakeRunner, fake_token, make_request

    cls = component("scheduler", scheduler)
    opts = cls.Options(max_num_batched_tokens=budget, max_num_seqs=3)
    sched = cls(opts, SchedulerContext(num_blocks=num_blocks, block_size=BLOCK, max_model_len=num_blocks * BLOCK,
                                       enable_prefix_caching=caching, sliding_window=window))
    d = Driver(sched, FakeRunner(BLOCK, budget, sliding_window=window))  # checks the KV inside every window
    shared = list(range(100, 140))
    reqs = {}
    for kind, arg, extra in ops:
        if kind == "add":
            rid = f"r{len(reqs)}"
            prompt = shared[:arg] + [3 + (len(reqs) * 31 + j) % 90 for j in range(1 + extra)]
            reqs[rid] = make_request(rid, prompt[:num_blocks * BLOCK - 2], max_tokens=4 + 3 * extra,
                                     priority=-len(reqs))
            d.add(reqs[rid])
        else:
            for _ in range(arg):
                if sched.has_unfinished_requests():
                    d.step()
                    held = sched.kv.stats().num_used_blocks
                    chunk_blocks = (window - 1 + budget) // BLOCK + 2  # the most one request can need at once
                    assert held <= len(sched.running) * chunk_blocks, (held, len(sched.running))
        sched.kv.check_invariants()
    d.run(max_steps=3000)
    sched.kv.check_invariants()
    assert sched.kv.stats().num_used_blocks == 0
    for rid, req in reqs.items():
        toks = d.tokens[rid]
        assert toks == [fake_token(rid, req.num_prompt_tokens + i) for i in range(len(toks))]


def test_random_windowed_programs_keep_the_kv_in_every_window():
    """Property test through the schedulers: random arrivals, chunked prefill, prefix hits and preemption (priority
    seats and a tight pool), and the fake worker checks that every position inside each token's window still holds
    that request's KV when it is read."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    op = st.one_of(st.tuples(st.just("add"), st.integers(0, 40), st.integers(0, 4)),
                   st.tuples(st.just("step"), st.integers(1, 8), st.just(0)))

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ops=st.lists(op, min_size=2, max_size=14), window=st.sampled_from([1, 5, 8, 13]),
           caching=st.booleans(), num_blocks=st.integers(16, 30), budget=st.sampled_from([1, 6, 16]),
           scheduler=st.sampled_from(["fcfs", "priority"]))
    def run(ops, window, caching, num_blocks, budget, scheduler):
        _windowed_program_run(ops, window, caching, num_blocks, budget, scheduler)

    run()


def test_flash_attn_window_argument_and_honest_check(monkeypatch):
    """flash-attn cannot run here: with fake entry points, its check refuses a build without `window_size`, and
    its impl passes flash-attn's `(w - 1, 0)` to each API (vLLM's FA3 op positionally)."""
    from weavelm.core.forward import AttentionSpec
    from weavelm.plugins.attention import flash_attn as fa
    from weavelm.testing._attention_batches import make_batch

    seen = []

    def fa2(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
            causal=False, window_size=(-1, -1), block_table=None):
        seen.append(("fa2", window_size))
        return torch.zeros_like(q)

    def fa2_without_windows(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                            softmax_scale=None, causal=False, block_table=None):
        return torch.zeros_like(q)

    def fa3(q, k_cache, v_cache, cache_seqlens=None, page_table=None, cu_seqlens_q=None, max_seqlen_q=None,
            softmax_scale=None, causal=False, window_size=(-1, -1)):
        seen.append(("fa3", window_size))
        return torch.zeros_like(q)

    def vllm_fa3(*args):
        seen.append(("vllm_fa3", args[25:27]))

    spec = AttentionSpec("cuda", torch.bfloat16, 128, 8, 8, 256, sliding_window=64)
    for kind, fn, refused in (("fa2", fa2, False), ("fa2", fa2_without_windows, True), ("fa3", fa3, False),
                              ("vllm_fa3", vllm_fa3, False)):
        monkeypatch.setattr(fa, "load_flash_api", lambda kind=kind, fn=fn: (kind, fn, ""))
        assert any("sliding_window 64" in r for r in fa.FlashAttnBackend.check(spec)) == refused, kind
        if refused:
            continue
        monkeypatch.setattr(fa, "reshape_and_cache", lambda *args: None)
        b = make_batch([3, 1], [20, 9], num_heads=4, num_kv_heads=2, head_size=16, block_size=4)
        for window in (8, None):
            impl = fa.FlashAttnBackend().make_impl(4, 2, 16, 0.25, **({"sliding_window": window} if window else {}))
            impl.forward(b.q, b.k, b.v, b.kv_cache, b.meta)
    assert seen == [("fa2", (7, 0)), ("fa2", (-1, -1)), ("fa3", (7, 0)), ("fa3", (-1, -1)),
                    ("vllm_fa3", (7, 0)), ("vllm_fa3", (-1, -1))]


def test_backend_written_before_windows_is_never_used_for_a_windowed_model():
    """A backend whose make_impl takes no `sliding_window` (plugin API < 2.3) is refused when named and skipped by
    `auto` for a windowed model, and still chosen for a model without windows."""
    import dataclasses

    from weavelm.errors import PluginError
    from weavelm.plugin import AttentionBackend, AttentionSpec, NoOptions
    from weavelm.plugins.attention.auto import AutoAttention
    from weavelm.plugins.attention.torch_ref import TorchRefBackend, TorchRefImpl

    class OldBackend(AttentionBackend):
        name = "old"
        description = "written for plugin API 2.2"
        priority = 100

        def make_impl(self, num_heads, num_kv_heads, head_size, scale):
            return TorchRefImpl(num_heads, num_kv_heads, head_size, scale)

    candidates = {"old": OldBackend, "torch_ref": TorchRefBackend}
    spec = AttentionSpec("cpu", torch.float32, 16, 4, 2, 16, sliding_window=WINDOW)
    with pytest.raises(PluginError, match="sliding_window 8: its make_impl takes no sliding_window"):
        OldBackend.select(NoOptions(), spec, candidates)
    assert type(AutoAttention.select(NoOptions(), spec, candidates)) is TorchRefBackend
    full = dataclasses.replace(spec, sliding_window=None)
    assert type(AutoAttention.select(NoOptions(), full, candidates)) is OldBackend
