"""Gemma 3 text (issue 25 #3): greedy tokens and logits equal transformers' eager forward on a tiny random
`Gemma3TextConfig` saved by transformers, with prompts and generations past the sliding window, in mixed batches
under chunked prefill, prefix caching and forced preemption; configs it cannot serve are refused by name.

The tiny model exercises every Gemma-specific piece: sliding and full layers interleaved (window 8), a different
rope per layer type (linear scaling on the global layers), `query_pre_attn_scalar` != head_dim, final logit
soft-capping, tied embeddings, and non-zero `(1 + weight)` norms (transformers initialises them to zero, so the
test perturbs them before saving). fp32 on the CPU: tokens identical, logits within 1e-4.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from weavelm import LLM, SamplingParams
from weavelm.core.hookspecs import hookimpl
from weavelm.errors import LoadError
from weavelm.testing import prompt_logits

GEMMA3 = "weavelm.plugins.models.gemma3"
WINDOW = 8
PROMPTS = [list(range(10, 40)), [5, 17, 42, 99, 3, 250, 77, 12, 400, 8, 61, 6], list(range(300, 321))]
MAX_TOKENS = 20
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def gemma3_config(**kw):
    from transformers import Gemma3TextConfig

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512, initializer_range=0.02,
                  sliding_window=WINDOW, layer_types=LAYER_TYPES, query_pre_attn_scalar=24,
                  final_logit_softcapping=30.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                   "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}})
    common.update(kw)
    return Gemma3TextConfig(**common)


@contextlib.contextmanager
def gemma3_plugin():
    """Every registry built inside (the engine's, its workers', the contract suite's) has the gemma3 model plugin,
    also where the installed weavelm's entry points predate it (pyproject.toml names it; a reinstall adds it)."""
    from weavelm.core import registry as registry_module
    from weavelm.testing._registry import registry

    if "gemma3" in registry().names("model"):
        yield
        return
    original = registry_module.RegistrySpec.from_env.__func__

    def from_env(cls):
        spec = original(cls)
        return replace(spec, modules=spec.modules + (GEMMA3,))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry_module.RegistrySpec, "from_env", classmethod(from_env))
        registry().register_module(GEMMA3)
        yield


@pytest.fixture(scope="module", autouse=True)
def _plugin():
    with gemma3_plugin():
        yield


def _hf(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(path, transformers model, greedy references for PROMPTS)."""
    from transformers import AutoModelForCausalLM

    path = str(tmp_path_factory.mktemp("gemma3"))
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(gemma3_config(), dtype=torch.float32)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    hf.save_pretrained(path)
    hf = _hf(path)
    return path, hf, [_hf_greedy(hf, p, MAX_TOKENS) for p in PROMPTS]


def _llm(path: str, attention: str = "torch_ref", **kw) -> LLM:
    return LLM(model=path, dtype="float32", device="cpu", loader="safetensors", attention=attention, **kw)


GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def test_the_references_depend_on_what_is_tested(model):
    """Without the window, or with the plain head_dim scale, transformers answers differently: the parity below
    tests both (and the references are not a constant token)."""
    path, hf, refs = model
    assert all(len(set(r)) > 3 for r in refs), refs
    for layer in hf.model.layers:
        layer.self_attn.sliding_window = None
    hf.config.sliding_window = 4096
    try:
        assert _hf_greedy(hf, PROMPTS[0], MAX_TOKENS) != refs[0]
    finally:
        hf.config.sliding_window = WINDOW
        for layer, kind in zip(hf.model.layers, LAYER_TYPES):
            layer.self_attn.sliding_window = WINDOW if kind == "sliding_attention" else None
    assert _hf_greedy(hf, PROMPTS[0], MAX_TOKENS) == refs[0]
    for layer in hf.model.layers:
        layer.self_attn.scaling = 16 ** -0.5
    try:
        assert _hf_greedy(hf, PROMPTS[0], MAX_TOKENS) != refs[0]
    finally:
        for layer in hf.model.layers:
            layer.self_attn.scaling = 24 ** -0.5


@pytest.mark.parametrize("attention", ["torch_ref", "cpu"])
def test_greedy_past_the_window_matches_transformers(model, attention):
    path, _, refs = model
    llm = _llm(path, attention, scheduler={"max_num_batched_tokens": 16})  # chunked prefill, mixed batches
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == refs


def test_soft_capped_logits_match_transformers(model):
    path, hf, _ = model
    llm = _llm(path, "cpu")
    for p in PROMPTS:
        with torch.no_grad():
            want = hf(torch.tensor([p])).logits[0].float()
        got = prompt_logits(llm, p, all_positions=True)[:len(p)]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert want.abs().max() < 30.0  # inside the cap, as soft-capping guarantees


class StepObserver:
    def __init__(self):
        self.stats = []

    @hookimpl
    def weavelm_step_finished(self, stats):
        self.stats.append(stats)


def test_prefix_caching_chunked_prefill_and_preemption(model):
    """Mixed batches of at most 10 tokens, two prompts sharing two full blocks (a prefix hit), and a KV budget of
    9 blocks of 4 that forces preemption: every output still equals transformers'."""
    from weavelm.core.registry import Registry

    path, hf, _ = model
    rng = random.Random(5)
    shared = [rng.randrange(3, 500) for _ in range(8)]
    own = [[rng.randrange(3, 500) for _ in range(n)] for n in (5, 17, 3)]
    prompts = own + [shared + own[0][:4], shared + own[2][:3]]
    want = [_hf_greedy(hf, p, 10) for p in prompts]
    observer = StepObserver()
    registry = Registry.load()
    registry.pm.register(observer)
    with _llm(path, "cpu", registry=registry, cache={"block_size": 4, "num_blocks": 9, "enable_prefix_caching": True},
              scheduler={"max_num_seqs": 4, "max_num_batched_tokens": 10, "long_prefill_token_threshold": 7}) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
        hit_rate = llm.get_stats().prefix_cache_hit_rate
    assert [o.outputs[0].token_ids for o in outs] == want
    assert sum(s.num_preempted for s in observer.stats) > 0, "the KV budget did not force a preemption"
    assert any(s.num_running > 1 for s in observer.stats), "no step mixed requests"
    assert hit_rate > 0


def test_unsupported_configs_are_refused_by_name(tmp_path):
    from weavelm.plugins.models.gemma3 import Gemma3ForCausalLM

    with torch.device("meta"):
        with pytest.raises(LoadError, match="attn_logit_softcapping"):
            Gemma3ForCausalLM(gemma3_config(attn_logit_softcapping=50.0))
        with pytest.raises(LoadError, match="hidden_activation"):
            Gemma3ForCausalLM(gemma3_config(hidden_activation="silu"))


def test_older_configs_give_each_layer_type_its_rope():
    """A config written before transformers 5 (`rope_theta`, `rope_scaling`, `rope_local_base_freq`) reads as the
    per-type sections transformers 5 builds from it."""
    from transformers import Gemma3TextConfig

    from weavelm.plugins.models.gemma3 import rope_sections

    old = SimpleNamespace(rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 8.0},
                          rope_local_base_freq=10000.0)
    new = Gemma3TextConfig(rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 8.0},
                           rope_local_base_freq=10000.0)
    assert rope_sections(old) == {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    for kind, section in rope_sections(new).items():
        assert {k: section[k] for k in rope_sections(old)[kind]} == rope_sections(old)[kind]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_norm_and_gelu_equal_transformers(dtype):
    """`GemmaRMSNorm` (with and without the fused residual add) and `GeluAndMul("tanh")` give transformers'
    `Gemma3RMSNorm` and `gelu_pytorch_tanh(gate) * up` bit for bit, in fp32 and bf16."""
    from transformers.activations import ACT2FN
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    from weavelm.layers import GeluAndMul, GemmaRMSNorm

    torch.manual_seed(0)
    ref, norm = Gemma3RMSNorm(32, eps=1e-6).to(dtype), GemmaRMSNorm(32, eps=1e-6).to(dtype)
    with torch.no_grad():
        ref.weight.normal_(0, 0.5)
        norm.weight.copy_(ref.weight)
    x, r = torch.randn(5, 32, dtype=dtype), torch.randn(5, 32, dtype=dtype)
    assert torch.equal(norm(x), ref(x))
    y, residual = norm(x, r)
    assert torch.equal(residual, x + r) and torch.equal(y, ref(x + r))
    heads_ref, heads = Gemma3RMSNorm(16, eps=1e-6).to(dtype), GemmaRMSNorm(16, eps=1e-6).to(dtype)
    with torch.no_grad():
        heads_ref.weight.normal_(0, 0.5)
        heads.weight.copy_(heads_ref.weight)
    assert torch.equal(heads(x.view(5, 2, 16)), heads_ref(x.view(5, 2, 16)))  # per head (the Q/K norms)
    gate_up = torch.randn(5, 64, dtype=dtype)
    assert torch.equal(GeluAndMul("tanh")(gate_up), ACT2FN["gelu_pytorch_tanh"](gate_up[:, :32]) * gate_up[:, 32:])
    with pytest.raises(ValueError, match="approximate"):
        GeluAndMul("sigmoid")
