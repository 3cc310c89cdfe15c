"""Multi-LoRA serving on CPU (fp32, greedy) against transformers with each adapter merged by peft.

- Parity: one batch mixes three adapters (ranks 4, 8, 16; attention, MLP, and embedding + lm_head targets, one
  rsLoRA) and the base model, on the tiny Llama and Qwen3: every request's tokens equal merged transformers'.
- Five adapters with `max_loras: 2` (and a host LRU of 2): every request finishes with its adapter's tokens, no
  step runs more than two adapters, and identical prompts on different adapters never share prefix-cache blocks.
- Bad input, each failing only its request while the others finish: rank above max_lora_rank, a module the model
  lacks, mismatched shapes, a missing path, an unknown adapter name, a `.bin` whose pickle would run code.
- A `.bin` adapter loads; config errors; `LLM.get_stats()` counts active adapters; tensor-parallel shards of the
  LoRA weights sum to the whole-weight result. Two-rank (multiproc, gloo) engines with adapters are the model
  contract's (tests/test_model_contract.py: Llama on every projection, Qwen3 with embedding and head adapters).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

from tests.lora_fixtures import ADAPTERS, build_adapter, merged_greedy
from weavelm import LLM, LoRARequest, SamplingParams
from weavelm.core.request import RequestStatus
from weavelm.errors import ConfigError, LoRAError

PROMPTS = [[5, 17, 33, 8, 99, 4], [7, 7, 21, 300, 11], [42, 1, 3, 9, 250, 77, 13], [100, 200, 300]]
MAX_TOKENS = 10
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    """{arch: {adapter name: path}} for llama and qwen3."""
    root = tmp_path_factory.mktemp("lora_adapters")
    return {arch: {name: build_adapter(tiny_models[arch], str(root / f"{arch}-{name}"), *spec, seed=i)
                   for i, (name, spec) in enumerate(ADAPTERS.items())}
            for arch in ("llama", "qwen3")}


def _requests(paths: dict[str, str]) -> list[LoRARequest | None]:
    return [LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(paths.items())] + [None]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_mixed_adapters_in_one_batch_match_merged_transformers(arch, tiny_models, adapters, one_torch_thread):
    base, loras = tiny_models[arch], _requests(adapters[arch])
    with LLM(model=base, dtype="float32", device="cpu", lora={"max_loras": 3, "max_lora_rank": 16}) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, lora_request=loras)
    base_tokens = [merged_greedy(base, None, p, MAX_TOKENS) for p in PROMPTS]
    for prompt, lora, out, plain in zip(PROMPTS, loras, outs, base_tokens):
        assert out.error is None
        ref = merged_greedy(base, None if lora is None else lora.lora_path, prompt, MAX_TOKENS)
        assert out.outputs[0].token_ids == ref, lora
        if lora is not None:
            assert ref != plain, f"adapter {lora.lora_name} does not change the output; the test would prove nothing"


def test_five_adapters_with_two_slots_all_finish_correctly(tiny_llama, tmp_path, one_torch_thread):
    paths = [build_adapter(tiny_llama, str(tmp_path / f"a{i}"), 4, 8, ["q_proj", "v_proj", "down_proj"], i % 2 == 1,
                           seed=10 + i) for i in range(5)]
    prompt = list(range(40, 60))  # more than a block: identical prompts would share KV blocks across adapters
    loras = [LoRARequest(f"a{i}", i + 1, p) for i, p in enumerate(paths)]
    llm = LLM(model=tiny_llama, dtype="float32", device="cpu",
              lora={"max_loras": 2, "max_lora_rank": 8, "max_cpu_loras": 2})
    engine = llm.engine
    rids = {engine.add_request({"prompt_token_ids": prompt}, GREEDY, lora_request=lora): lora
            for lora in loras + loras[:2] + [None]}
    done, active_seen = {}, set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        active_seen.add(llm.get_stats().num_active_loras)
    llm.shutdown()
    assert max(active_seen) == 2 and 2 in active_seen
    refs = {None: merged_greedy(tiny_llama, None, prompt, MAX_TOKENS)}
    refs.update({lora.lora_int_id: merged_greedy(tiny_llama, lora.lora_path, prompt, MAX_TOKENS) for lora in loras})
    assert len(set(map(tuple, refs.values()))) == 6
    for rid, lora in rids.items():
        assert done[rid].error is None
        assert done[rid].outputs[0].token_ids == refs[None if lora is None else lora.lora_int_id], lora


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _rewrite_tensors(path: str, edit) -> None:
    from safetensors.torch import load_file, save_file
    f = os.path.join(path, "adapter_model.safetensors")
    save_file(edit(load_file(f)), f)


@pytest.fixture(scope="module")
def bad_adapters(adapters, tmp_path_factory):
    good = adapters["llama"]
    root = tmp_path_factory.mktemp("bad_adapters")
    foreign = _copy(good["attn4"], root / "foreign_module")
    _rewrite_tensors(foreign, lambda t: {k.replace("q_proj", "c_attn"): v for k, v in t.items()})
    misshaped = _copy(good["attn4"], root / "misshaped")
    _rewrite_tensors(misshaped, lambda t: {k: (v[:, :32].contiguous() if "lora_A" in k and "q_proj" in k else v)
                                           for k, v in t.items()})
    unknown_target = _copy(good["attn4"], root / "unknown_target")
    with open(os.path.join(unknown_target, "adapter_config.json")) as f:
        cfg = json.load(f)
    cfg["target_modules"] = ["q_proj", "query_key_value"]
    with open(os.path.join(unknown_target, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    evil = _copy(good["attn4"], root / "evil_bin")
    os.remove(os.path.join(evil, "adapter_model.safetensors"))
    marker = root / "pwned"
    with open(os.path.join(evil, "adapter_model.bin"), "wb") as f:
        pickle.dump(_RunsCode(str(marker)), f)
    return {"foreign": foreign, "misshaped": misshaped, "unknown_target": unknown_target, "evil": evil,
            "marker": str(marker)}


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_bad_adapters_fail_only_their_request(tiny_llama, adapters, bad_adapters, one_torch_thread):
    good = adapters["llama"]
    cases = [
        (LoRARequest("rank16", 11, good["mix16"]), "rank 16, above lora.max_lora_rank=8"),
        (LoRARequest("foreign", 12, bad_adapters["foreign"]), "targets 'c_attn', which this model lacks"),
        (LoRARequest("targets", 13, bad_adapters["unknown_target"]),
         "target_modules ['query_key_value'] are not modules of this model"),
        (LoRARequest("misshaped", 14, bad_adapters["misshaped"]), "but this model needs A (r, 64)"),
        (LoRARequest("missing", 15, "/nonexistent/adapter"), "no such directory"),
        ("no-such-adapter", "unknown LoRA adapter 'no-such-adapter'; configured adapters: attn4"),
        (LoRARequest("evil", 16, bad_adapters["evil"]), "loading it would run code; refused"),
    ]
    ok = LoRARequest("attn4", 1, good["attn4"])
    loras = [ok, None] + [c[0] for c in cases]
    prompts = [{"prompt_token_ids": PROMPTS[i % len(PROMPTS)]} for i in range(len(loras))]
    with LLM(model=tiny_llama, dtype="float32", device="cpu",
             lora={"max_loras": 2, "max_lora_rank": 8, "adapters": {"attn4": good["attn4"]}}) as llm:
        outs = llm.generate(prompts, GREEDY, lora_request=loras)
    assert outs[0].error is None and outs[1].error is None
    assert outs[0].outputs[0].token_ids == merged_greedy(tiny_llama, good["attn4"], PROMPTS[0], MAX_TOKENS)
    assert outs[1].outputs[0].token_ids == merged_greedy(tiny_llama, None, PROMPTS[1], MAX_TOKENS)
    for out, (_, message) in zip(outs[2:], cases):
        assert out.outputs[0].finish_reason == "error" and message in out.error, out.error
    assert not os.path.exists(bad_adapters["marker"])


def test_bin_adapter_and_configured_name(tiny_llama, adapters, tmp_path, one_torch_thread):
    src = adapters["llama"]["mlp8"]
    path = build_adapter(tiny_llama, str(tmp_path / "bin"), *ADAPTERS["mlp8"], seed=1, safe=False)
    assert os.path.isfile(os.path.join(path, "adapter_model.bin"))
    with LLM(model=tiny_llama, dtype="float32", device="cpu", lora={"max_lora_rank": 8, "adapters": {"m": src}}) as llm:
        by_bin, by_name = llm.generate([{"prompt_token_ids": PROMPTS[0]}] * 2, GREEDY,
                                       lora_request=[LoRARequest("bin", 5, path), "m"])
    ref = merged_greedy(tiny_llama, src, PROMPTS[0], MAX_TOKENS)
    assert by_bin.outputs[0].token_ids == ref and by_name.outputs[0].token_ids == ref


def test_lora_request_without_lora_section_and_id_clash(tiny_llama, adapters, one_torch_thread):
    path = adapters["llama"]["attn4"]
    with LLM(model=tiny_llama, dtype="float32", device="cpu") as llm:
        out = llm.generate({"prompt_token_ids": PROMPTS[0]}, GREEDY, lora_request=LoRARequest("a", 1, path))[0]
    assert "this engine serves no adapters; add a `lora:` section" in out.error
    with LLM(model=tiny_llama, dtype="float32", device="cpu", lora={"max_lora_rank": 16}) as llm:
        outs = llm.generate([{"prompt_token_ids": PROMPTS[0]}] * 2, GREEDY,
                            lora_request=[LoRARequest("a", 1, path), LoRARequest("b", 1, adapters["llama"]["mlp8"])])
    assert outs[0].error is None and "lora_int_id 1 already names adapter 'a'" in outs[1].error
    with pytest.raises(LoRAError, match="lora_int_id: must be an integer >= 1"):
        LoRARequest("x", 0, path)


def test_lora_config_is_validated(tiny_llama):
    from weavelm.core.config import EngineConfig
    with pytest.raises(ConfigError) as e:
        EngineConfig.build({"model": tiny_llama, "lora": {"max_loras": 0, "max_lora_rnak": 8}})
    text = str(e.value)
    assert "lora.max_loras: Input should be greater than or equal to 1" in text
    assert "lora.max_lora_rnak: unknown option" in text
    with pytest.raises(ConfigError, match="max_cpu_loras \\(1\\) must be >= max_loras \\(2\\)"):
        EngineConfig.build({"model": tiny_llama, "lora": {"max_loras": 2, "max_cpu_loras": 1}})
    cfg = EngineConfig.build({"model": tiny_llama, "lora": {"max_loras": 2}})
    assert cfg.lora.name == "punica" and cfg.to_dict()["lora"]["max_loras"] == 2
    assert EngineConfig.build({"model": tiny_llama}).lora is None


def test_vllm_lora_arguments_port(tiny_llama, adapters):
    """vLLM's `enable_lora`, `max_loras`, `max_lora_rank`, `max_cpu_loras` and `--lora-modules NAME=PATH`."""
    from weavelm.cli import build_parser, engine_config_from_args
    from weavelm.core.compat import apply_vllm_aliases
    from weavelm.core.config import EngineConfig

    raw = apply_vllm_aliases({"model": tiny_llama, "enable_lora": True, "max_loras": 2, "max_lora_rank": 8,
                              "max_cpu_loras": 4})
    opts = EngineConfig.build(raw).lora.options
    assert (opts.max_loras, opts.max_lora_rank, opts.max_cpu_loras) == (2, 8, 4)
    args = build_parser().parse_args(["generate", "--model", tiny_llama, "--enable-lora", "--lora-modules",
                                      f"sql={adapters['llama']['attn4']}", "--max-lora-rank", "4"])
    opts = engine_config_from_args(args).lora.options
    assert opts.adapters == {"sql": adapters["llama"]["attn4"]} and opts.max_lora_rank == 4
    with pytest.raises(ConfigError, match="lora_modules: expects NAME=PATH items"):
        apply_vllm_aliases({"lora_modules": ["sql"]})


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_lora_shards_sum_to_the_whole(world):
    """Each rank's wrapped QKV / gate-up (B's rows sharded) and o / down (A's columns sharded) layers, with the
    collectives left out, concatenate / sum to the whole-weight LoRA result."""
    from tests.test_tensor_parallel import LocalGroup
    from weavelm.layers import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
    from weavelm.lora.batch import LoRABatchState
    from weavelm.lora.layers import (MergedColumnParallelLinearWithLoRA, QKVParallelLinearWithLoRA,
                                     RowParallelLinearWithLoRA)
    from weavelm.lora.ops import lora_reference

    hidden, head_dim, heads, kv_heads, inter, r = 32, 4, 8, 2, 48, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, hidden, generator=g)
    slots = torch.tensor([0, -1, 0, 0, -1])
    ab = {m: (torch.randn(r, i, generator=g), torch.randn(o, r, generator=g)) for m, (i, o) in {
        "q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
        "o_proj": (heads * head_dim, hidden), "down_proj": (inter, hidden)}.items()}

    def whole(m, inp):
        a, b = ab[m]
        return lora_reference(inp, slots, a[None], b[None])

    qkv_parts, gu_parts, o_out, down_out = [], [], 0, 0
    for rank in range(world):
        tp = LocalGroup(rank, world)
        state = LoRABatchState(1, 8, torch.device("cpu"))
        state.tokens.set(slots.numpy())
        qkv = QKVParallelLinear(hidden, head_dim, heads, kv_heads, False, tp)
        gu = MergedColumnParallelLinear(hidden, [inter, inter], False, tp)
        o = RowParallelLinear(heads * head_dim, hidden, False, tp)
        down = RowParallelLinear(inter, hidden, False, tp)
        for layer in (qkv, gu, o, down):
            layer.weight.data.zero_()
        kw = dict(dtype=torch.float32, device=torch.device("cpu"))
        wq = QKVParallelLinearWithLoRA(qkv, state, 1, r, **kw)
        wg = MergedColumnParallelLinearWithLoRA(gu, state, 1, r, **kw)
        wo, wd = RowParallelLinearWithLoRA(o, state, 1, r, **kw), RowParallelLinearWithLoRA(down, state, 1, r, **kw)
        assert all(type(w).can_replace_layer(base) for w, base in ((wq, qkv), (wg, gu), (wo, o), (wd, down)))
        assert not QKVParallelLinearWithLoRA.can_replace_layer(gu)
        assert not RowParallelLinearWithLoRA.can_replace_layer(qkv)
        s0, s1 = gu.sizes
        for w, names in ((wq, ("q_proj", "k_proj", "v_proj")), (wg, ("gate_proj", "up_proj")), (wo, ("o_proj",)),
                         (wd, ("down_proj",))):
            for part, n in enumerate(names):
                w.set_lora(0, part, *ab[n])
        y = wq(x)
        qkv_parts.append(y.split([qkv.q_size, qkv.kv_size, qkv.kv_size], -1))
        gu_parts.append(wg(x).split([s0, s1], -1))
        xo = torch.randn(5, heads * head_dim, generator=torch.Generator().manual_seed(1))
        xd = torch.randn(5, inter, generator=torch.Generator().manual_seed(2))
        o_out = o_out + wo(xo.narrow(1, rank * o.in_per_rank, o.in_per_rank))
        down_out = down_out + wd(xd.narrow(1, rank * down.in_per_rank, down.in_per_rank))
    torch.testing.assert_close(torch.cat([p[0] for p in qkv_parts], -1), whole("q_proj", x))
    step = max(1, world // kv_heads)  # replicated KV heads: take one rank per KV head
    torch.testing.assert_close(torch.cat([p[1] for p in qkv_parts[::step]], -1), whole("k_proj", x))
    torch.testing.assert_close(torch.cat([p[2] for p in qkv_parts[::step]], -1), whole("v_proj", x))
    torch.testing.assert_close(torch.cat([p[0] for p in gu_parts], -1), whole("gate_proj", x))
    torch.testing.assert_close(torch.cat([p[1] for p in gu_parts], -1), whole("up_proj", x))
    torch.testing.assert_close(o_out, whole("o_proj", xo))
    torch.testing.assert_close(down_out, whole("down_proj", xd))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_fused_module_adapters_shard_by_part(world):
    """An adapter of a fused checkpoint module (Phi-3's `qkv_proj` / `gate_up_proj`: one A, B over all parts) on
    each rank's packed layer: every part's rows of B are sharded like that part, so the ranks' outputs reassemble
    the whole-weight delta part by part (KV heads replicated when there are more ranks than KV heads)."""
    from tests.test_tensor_parallel import LocalGroup
    from weavelm.layers import MergedColumnParallelLinear, QKVParallelLinear
    from weavelm.lora.batch import LoRABatchState
    from weavelm.lora.layers import MergedColumnParallelLinearWithLoRA, QKVParallelLinearWithLoRA
    from weavelm.lora.ops import lora_reference

    hidden, head_dim, heads, kv_heads, inter, r = 32, 4, 8, 2, 48, 4
    q, kv = heads * head_dim, kv_heads * head_dim
    g = torch.Generator().manual_seed(3)
    x, slots = torch.randn(4, hidden, generator=g), torch.tensor([0, 0, -1, 0])
    a_qkv, b_qkv = torch.randn(r, hidden, generator=g), torch.randn(q + 2 * kv, r, generator=g)
    a_gu, b_gu = torch.randn(r, hidden, generator=g), torch.randn(2 * inter, r, generator=g)
    want_qkv = lora_reference(x, slots, a_qkv[None], b_qkv[None]).split([q, kv, kv], -1)
    want_gu = lora_reference(x, slots, a_gu[None], b_gu[None]).split([inter, inter], -1)
    got_qkv, got_gu = [], []
    for rank in range(world):
        tp = LocalGroup(rank, world)
        state = LoRABatchState(1, 8, torch.device("cpu"))
        state.tokens.set(slots.numpy())
        qkv = QKVParallelLinear(hidden, head_dim, heads, kv_heads, False, tp)
        gu = MergedColumnParallelLinear(hidden, [inter, inter], False, tp)
        for layer in (qkv, gu):
            layer.weight.data.zero_()
        kw = dict(dtype=torch.float32, device=torch.device("cpu"))
        wq = QKVParallelLinearWithLoRA(qkv, state, 1, r, **kw)
        wg = MergedColumnParallelLinearWithLoRA(gu, state, 1, r, **kw)
        assert wq.part_shapes() == [(hidden, q), (hidden, kv), (hidden, kv)]
        wq.set_lora(0, None, a_qkv, b_qkv)
        wg.set_lora(0, None, a_gu, b_gu)
        got_qkv.append(wq(x).split([qkv.q_size, qkv.kv_size, qkv.kv_size], -1))
        got_gu.append(wg(x).split(gu.sizes, -1))
    step = max(1, world // kv_heads)
    torch.testing.assert_close(torch.cat([p[0] for p in got_qkv], -1), want_qkv[0])
    torch.testing.assert_close(torch.cat([p[1] for p in got_qkv[::step]], -1), want_qkv[1])
    torch.testing.assert_close(torch.cat([p[2] for p in got_qkv[::step]], -1), want_qkv[2])
    torch.testing.assert_close(torch.cat([p[0] for p in got_gu], -1), want_gu[0])
    torch.testing.assert_close(torch.cat([p[1] for p in got_gu], -1), want_gu[1])


def test_embedding_adapters_on_tied_embeddings_are_refused(tmp_path, one_torch_thread):
    from tests.model_fixtures import build_tiny_model

    base = build_tiny_model("llama", str(tmp_path / "tied"), seed=4, tie_word_embeddings=True)
    path = build_adapter(base, str(tmp_path / "emb"), 4, 8, ["q_proj", "embed_tokens"], False, seed=5)
    with LLM(model=base, dtype="float32", device="cpu", lora={"max_lora_rank": 8}) as llm:
        bad, ok = llm.generate([{"prompt_token_ids": PROMPTS[0]}] * 2, GREEDY,
                               lora_request=[LoRARequest("emb", 1, path), None])
    assert "ties lm_head to embed_tokens" in bad.error and ok.error is None
    assert ok.outputs[0].token_ids == merged_greedy(base, None, PROMPTS[0], MAX_TOKENS)


def test_prompt_logprobs_use_the_adapter(tiny_llama, adapters, one_torch_thread):
    """Prompt logprobs (the head over each prompt position, one request at a time) see the request's adapter,
    embedding and lm_head parts included."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = adapters["llama"]["mix16"]
    prompt = PROMPTS[2]
    with LLM(model=tiny_llama, dtype="float32", device="cpu", lora={"max_lora_rank": 16}) as llm:
        out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, temperature=0,
                                                                        prompt_logprobs=0),
                           lora_request=LoRARequest("mix16", 1, path))[0]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), path)
    with torch.no_grad():
        ref = model.merge_and_unload()(torch.tensor([prompt])).logits[0].log_softmax(-1)
    got = [entry[tok].logprob for entry, tok in zip(out.prompt_logprobs[1:], prompt[1:])]
    want = [ref[i, tok].item() for i, tok in enumerate(prompt[1:])]
    assert got == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_scheduler_admits_at_most_max_loras_adapters_and_lets_others_pass(policy):
    """A request whose adapter would exceed max_loras waits (kept at the front), while base-model requests and
    requests on active adapters behind it are admitted; it runs once a slot's requests finish."""
    from dataclasses import replace

    from tests.scheduler_utils import make_request, make_scheduler
    from weavelm.lora.manager import LoRAOptions
    from weavelm.plugins.lora.punica import PunicaLoRAManager

    sched = make_scheduler(policy)
    sched.context = replace(sched.context, lora=PunicaLoRAManager(LoRAOptions(max_loras=1)))
    one, two = LoRARequest("one", 1, "/a/one"), LoRARequest("two", 2, "/a/two")
    for rid, lora in (("a", one), ("b", two), ("c", one), ("d", None)):
        req = make_request(rid, 6, max_tokens=2)
        req.lora_request = lora
        sched.add_request(req)
    out = sched.schedule()
    assert [r.req_id for r in out.scheduled_new_reqs] == ["a", "c", "d"]
    assert [r.lora_request for r in out.scheduled_new_reqs] == [one, one, None]
    assert [r.request_id for r in sched.waiting] == ["b"] and sched.get_stats().num_active_loras == 1
    sched.finish_requests(["a", "c"], RequestStatus.FINISHED_ABORTED)
    out = sched.schedule()
    assert [r.req_id for r in out.scheduled_new_reqs] == ["b"] and sched.get_stats().num_active_loras == 1
