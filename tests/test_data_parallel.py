"""`data_parallel_size=2` on the CPU (fp32, the tiny Llama): two engine-core replica processes behind one client.

One 2-replica `LLM` serves the module: greedy tokens equal transformers' over a mixed batch that preempts (9 KV
blocks per replica), both replicas serve (per-replica stats), aborts reach the request's replica, stats sum the
replicas, a repeated first prompt block returns to its replica, and, last, a replica killed mid-flight fails only its
own requests (ReplicaDeadError text naming it, within 10 s) while the other finishes its requests and takes the new
ones. An `AsyncLLM` shows the same failure as the typed exception in the lost streams, and the CLI flag
`--data-parallel-size` runs `weavelm generate`. No replica process outlives its engine.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest

from tests.dp_utils import alive, slow_steps, wait_gone
from tests.model_fixtures import hf_greedy
from weavelm import LLM, SamplingParams
from weavelm.core.dp_client import AsyncDPClient, DPClient
from weavelm.errors import ReplicaDeadError

ENGINE = dict(dtype="float32", device="cpu", loader="safetensors", num_threads=1, data_parallel_size=2,
              cache={"block_size": 4, "num_blocks": 9, "enable_prefix_caching": True},
              scheduler={"max_num_seqs": 4})
MAX_TOKENS = 12
SLOW_TOKENS = 24


def _prompts() -> list[list[int]]:
    rng = random.Random(3)
    shared = [rng.randrange(3, 512) for _ in range(8)]
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (5, 19, 11, 14, 3)]
    return prompts + [shared + prompts[0][:6], shared + prompts[2][:9]]  # two share two full blocks


PROMPTS = _prompts()
SLOW_PROMPTS = [[9, 8, 7], [31, 32, 33, 34], [50, 51], [77, 78, 79]]
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
SLOW = SamplingParams(max_tokens=SLOW_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def references(tiny_llama):
    return {tuple(p): hf_greedy(tiny_llama, p, MAX_TOKENS) for p in PROMPTS}


@pytest.fixture(scope="module")
def llm(tiny_llama):
    with LLM(tiny_llama, **ENGINE) as llm:
        assert isinstance(llm.engine.client, DPClient)
        pids = llm.engine.client.replica_pids
        assert len(set(pids)) == 2 and all(alive(p) for p in pids)
        yield llm
    assert wait_gone(pids) == [], "a replica process outlived its engine"


def rows(llm):
    return llm.get_stats().replicas


def test_greedy_tokens_match_transformers_with_preemption_on_both_replicas(llm, references):
    before = rows(llm)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [references[tuple(p)] for p in PROMPTS]
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    after = rows(llm)
    served = [a.num_requests - b.num_requests for a, b in zip(after, before)]
    assert sum(served) == len(PROMPTS) and min(served) >= 2, f"unbalanced: {served}"
    assert sum(a.num_preemptions for a in after) > 0, "9 KV blocks per replica did not force a preemption"


def test_stats_sum_the_replicas_with_a_row_each(llm):
    engine = llm.engine
    ids = [engine.add_request({"prompt_token_ids": p}, GREEDY) for p in PROMPTS[:4]]
    engine.step()
    stats = llm.get_stats()
    assert [r.index for r in stats.replicas] == [0, 1] and all(r.alive for r in stats.replicas)
    assert stats.num_total_blocks == 18 == sum(r.num_total_blocks for r in stats.replicas)
    assert stats.num_running_reqs == sum(r.num_running_reqs for r in stats.replicas) > 0
    assert stats.num_waiting_reqs == sum(r.num_waiting_reqs for r in stats.replicas)
    assert stats.num_used_blocks == sum(r.num_used_blocks for r in stats.replicas) > 0
    assert stats.kv_cache_usage == pytest.approx(stats.num_used_blocks / 18)
    assert all(r.num_running_reqs + r.num_waiting_reqs > 0 for r in stats.replicas), \
        f"one replica held them all: {stats.replicas}, owners {[engine.client.owner[r].index for r in ids]}"
    _drain(engine, ids)
    idle = llm.get_stats()
    assert (idle.num_running_reqs, idle.num_waiting_reqs, idle.num_used_blocks) == (0, 0, 0)

    from weavelm.serve.metrics import ServerMetrics

    metrics = ServerMetrics("tiny")
    metrics.set_stats(idle)
    text = metrics.render().decode()
    assert 'weavelm:kv_cache_total_blocks{model_name="tiny"} 18.0' in text
    for row in idle.replicas:
        assert (f'weavelm:dp_replica_num_requests_routed{{engine="{row.index}",model_name="tiny"}} '
                f'{float(row.num_requests)}') in text


def test_aborts_reach_the_replica_holding_the_request(llm, references):
    engine, client = llm.engine, llm.engine.client
    ids = [engine.add_request({"prompt_token_ids": p}, GREEDY, request_id=f"ab-{i}")
           for i, p in enumerate(PROMPTS[:4])]
    engine.step()
    owners = {rid: client.owner[rid].index for rid in ids}
    aborted = [next(r for r in ids if owners[r] == k) for k in (0, 1)]  # one on each replica
    engine.abort_request(aborted)
    finals = _drain(engine, ids)
    for i, rid in enumerate(ids):
        out = finals[rid].outputs[0]
        if rid in aborted:
            assert out.finish_reason == "abort"
        else:
            assert (out.finish_reason, out.token_ids) == ("length", references[tuple(PROMPTS[i])])
    assert client.owner == {}


def test_a_repeated_first_block_returns_to_its_replica(llm):
    first = [401, 402, 403, 404, 405, 406]
    served = []
    for tail in ([7, 8], [9, 10, 11]):
        before = rows(llm)
        llm.generate([{"prompt_token_ids": first + tail}], GREEDY, use_tqdm=False)
        after = rows(llm)
        served.append([a.num_requests - b.num_requests for a, b in zip(after, before)].index(1))
    assert served[0] == served[1]


def test_a_dead_replica_fails_only_its_requests(llm, tiny_llama):
    engine, client = llm.engine, llm.engine.client
    refs = {tuple(p): hf_greedy(tiny_llama, p, SLOW_TOKENS) for p in SLOW_PROMPTS}
    llm.collective_rpc("set_logits_hook", (slow_steps,))
    ids = [engine.add_request({"prompt_token_ids": p}, SLOW, request_id=f"slow-{i}")
           for i, p in enumerate(SLOW_PROMPTS)]
    finals, started = {}, set()
    while len(started) < len(ids):  # every request has a token: all are running
        for out in engine.step():
            started.add(out.request_id)
    owners = {rid: client.owner[rid].index for rid in ids}
    assert set(owners.values()) == {0, 1}
    victim = client.replica_pids[1]
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    noticed = None
    while len(finals) < len(ids):
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
                if owners[out.request_id] == 1 and noticed is None:
                    noticed = time.monotonic() - killed
    assert noticed is not None and noticed < 10, noticed
    for i, rid in enumerate(ids):
        out = finals[rid]
        if owners[rid] == 1:
            assert out.outputs[0].finish_reason == "error"
            assert out.error.startswith("ReplicaDeadError: data-parallel replica 1 is dead")
            assert f"pid {victim}" in out.error and "SIGKILL" in out.error
        else:
            assert out.outputs[0].token_ids == refs[tuple(SLOW_PROMPTS[i])]
    llm.collective_rpc("set_logits_hook", (None,))
    llm.engine.client.check_health()  # one replica left: still healthy
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:3]], GREEDY, use_tqdm=False)
    assert all(o.error is None and o.outputs[0].finish_reason == "length" for o in outs)
    stats = llm.get_stats()
    assert [r.alive for r in stats.replicas] == [True, False]
    assert stats.num_total_blocks == 9
    assert not alive(victim)


def test_async_streams_of_a_dead_replica_raise_replica_dead_error(tiny_llama):
    from weavelm.core.async_llm import AsyncLLM

    engine = AsyncLLM(tiny_llama, **ENGINE)
    client = engine.client
    assert isinstance(client, AsyncDPClient)
    pids = client.replica_pids
    refs = {tuple(p): hf_greedy(tiny_llama, p, SLOW_TOKENS) for p in SLOW_PROMPTS}

    async def run():
        await engine.collective_rpc("set_logits_hook", (slow_steps,))
        streams = [await engine.add_request({"prompt_token_ids": p}, SLOW, f"slow-{i}")
                   for i, p in enumerate(SLOW_PROMPTS)]
        firsts = [await s.__anext__() for s in streams]
        assert all(len(f.outputs[0].token_ids) >= 1 for f in firsts)
        owners = [client.owner[s.request_id].index for s in streams]
        assert set(owners) == {0, 1}
        os.kill(pids[1], signal.SIGKILL)
        killed = time.monotonic()

        async def finish(stream):
            last = None
            try:
                async for last in stream:
                    pass
            except ReplicaDeadError as e:
                return e, time.monotonic() - killed
            return last, None

        results = await asyncio.gather(*(finish(s) for s in streams))
        for stream, owner, (result, after) in zip(streams, owners, results):
            if owner == 1:
                assert isinstance(result, ReplicaDeadError) and result.replica == 1 and result.pid == pids[1]
                assert "data-parallel replica 1" in str(result) and after < 10
            else:
                prompt = SLOW_PROMPTS[int(stream.request_id.split("-")[1])]
                assert result.outputs[0].token_ids == refs[tuple(prompt)]
        await engine.collective_rpc("set_logits_hook", (None,))
        engine.check_health()  # the other replica still serves
        final = None
        async for final in engine.generate({"prompt_token_ids": PROMPTS[0]}, GREEDY):
            pass
        assert final.outputs[0].finish_reason == "length"
        stats = await engine.get_stats()
        assert [r.alive for r in stats.replicas] == [True, False]

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()
    assert wait_gone(pids) == []


def test_cli_flag_runs_generate_on_two_replicas(smol_tokenizer_model, capsys):
    from weavelm.cli import build_parser, engine_config_from_args, main

    args = build_parser().parse_args(["serve", "--model", "m", "--data-parallel-size", "2"])
    assert engine_config_from_args(args).data_parallel_size == 2
    prompts = ["Hello", "The capital of France is", "One two", "Hi"]
    with LLM(smol_tokenizer_model, dtype="float32", device="cpu", loader="safetensors") as single:
        want = [o.outputs[0].text for o in single.generate(prompts, SamplingParams(max_tokens=4, temperature=0,
                                                                                   ignore_eos=True),
                                                            use_tqdm=False)]
    argv = ["generate", "--model", smol_tokenizer_model, "--device", "cpu", "--dtype", "float32",
            "--data-parallel-size", "2", "--max-tokens", "4", "--ignore-eos", "-q"]
    for p in prompts:
        argv += ["--prompt", p]
    assert main(argv) == 0
    assert capsys.readouterr().out == "".join(f"{p}{t}\n" for p, t in zip(prompts, want))


def _drain(engine, ids: list[str]) -> dict:
    finals = {}
    while len(finals) < len(ids):
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return finals
