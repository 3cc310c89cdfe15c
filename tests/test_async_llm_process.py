"""AsyncLLM over both async clients (the core in its own process: `AsyncMPClient`; in this process, stepped by the
client's thread: `AsyncInprocClient`): the same tokens as `LLM.generate` for concurrent requests, n > 1 merged, a
later event loop takes over, cancellation frees the blocks, a refused request ends its stream with an error, a
killed core fails every stream within seconds, and a frozen core (SIGSTOP) ends in EngineDeadError at the iteration
deadline, for `LLM.generate` too."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from weavelm import LLM, SamplingParams
from weavelm.core.async_llm import AsyncLLM
from weavelm.core.client import AsyncInprocClient
from weavelm.core.mp_client import AsyncMPClient
from weavelm.errors import EngineDeadError, RequestError
from tests.test_engine_process import ENGINE, child_alive

PROMPTS = [[5, 6, 7, 8], [21, 22], list(range(40, 60)), [3]]


def params(i: int) -> SamplingParams:
    if i % 2:
        return SamplingParams(max_tokens=7, temperature=0.9, top_k=50, seed=100 + i, ignore_eos=True)
    return SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def want(tiny_llama):
    with LLM(model=tiny_llama, **ENGINE) as llm:
        return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason)
                for o in llm.generate(PROMPTS * 3, [params(i) for i in range(len(PROMPTS) * 3)])]


@pytest.fixture(scope="module", params=[True, False], ids=["core-process", "core-thread"])
def engine(request, tiny_llama):
    engine = AsyncLLM(model=tiny_llama, engine_process=request.param, **ENGINE)
    assert isinstance(engine.client, AsyncMPClient if request.param else AsyncInprocClient)
    yield engine
    engine.shutdown()


async def collect(engine: AsyncLLM, prompt, sp: SamplingParams, rid: str | None = None) -> tuple:
    ids, text, finish = [], "", None
    async for out in engine.generate(prompt, sp, rid, delta=True):
        comp = out.outputs[0]
        ids += comp.token_ids
        text += comp.text
        finish = comp.finish_reason
    return ids, text, finish


def test_concurrent_requests_match_llm_generate(engine, want):
    async def run():
        return await asyncio.gather(*(collect(engine, p, params(i)) for i, p in enumerate(PROMPTS * 3)))

    assert asyncio.run(run()) == want

    async def n2():  # n > 1 fans out in the frontend and merges back into one stream
        sp = SamplingParams(max_tokens=5, temperature=0.8, seed=3, n=2, ignore_eos=True)
        outs = [o async for o in engine.generate([5, 6, 7], sp)]
        return sorted(len(c.token_ids) for c in outs[-1].outputs), outs[-1].finished, len(outs[-1].outputs)

    assert asyncio.run(n2()) == ([5, 5], True, 2)  # a second event loop took over
    assert asyncio.run(engine.get_stats()).num_running_reqs == 0


def test_cancel_frees_blocks_and_refused_requests_end_with_an_error(engine):
    async def run():
        long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        task = asyncio.ensure_future(collect(engine, [5, 6, 7], long))
        while engine.num_unfinished == 0 or (await engine.get_stats()).num_running_reqs == 0:
            await asyncio.sleep(0.01)
        stats = await engine.get_stats()
        assert stats.num_running_reqs == 1 and stats.num_used_blocks > 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            stats = await engine.get_stats()
            if stats.num_used_blocks == 0:
                break
            await asyncio.sleep(0.01)
        # 40 tokens > the 32-token budget with chunked prefill off: the core itself refuses it
        refused = [o async for o in engine.generate(list(range(1, 41)), SamplingParams(max_tokens=2))]
        with pytest.raises(RequestError, match="max_tokens"):
            await engine.add_request([1, 2], SamplingParams(max_tokens=0))
        return stats, refused

    stats, refused = asyncio.run(run())
    assert (stats.num_running_reqs, stats.num_waiting_reqs, stats.num_used_blocks) == (0, 0, 0)
    assert refused[-1].finished and refused[-1].error and refused[-1].outputs[0].finish_reason == "error"
    assert engine.num_unfinished == 0 and not engine.errored


def test_killed_core_fails_every_stream(tiny_llama):
    engine = AsyncLLM(model=tiny_llama, engine_process=True, **ENGINE)
    pid = engine.client.core_pid
    try:
        async def run():
            long = SamplingParams(max_tokens=240, temperature=0.0, ignore_eos=True)
            streams = [await engine.add_request([5 + i, 6, 7], long, delta=True) for i in range(3)]
            await streams[0].__anext__()
            os.kill(pid, signal.SIGKILL)
            t0 = time.monotonic()
            errors = []
            for stream in streams:
                with pytest.raises(EngineDeadError) as info:
                    async for _ in stream:
                        pass
                errors.append(str(info.value))
            assert time.monotonic() - t0 < 10
            with pytest.raises(EngineDeadError):
                await engine.add_request([1, 2], long)
            return errors

        errors = asyncio.run(run())
        assert all(f"pid {pid}" in e and "SIGKILL" in e for e in errors)
        with pytest.raises(EngineDeadError):
            engine.check_health()
    finally:
        engine.shutdown()
    assert not child_alive(pid)


def test_health_notices_a_dead_core_before_any_request(tiny_llama):
    engine = AsyncLLM(model=tiny_llama, engine_process=True, **ENGINE)
    pid = engine.client.core_pid
    try:
        engine.check_health()
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError, match="SIGKILL"):
            while time.monotonic() - t0 < 10:  # the kernel takes a moment to finish the process off
                engine.check_health()
                time.sleep(0.05)
        assert engine.errored
    finally:
        engine.shutdown()
