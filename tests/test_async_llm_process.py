"""AsyncLLM over an engine-core process (`engine_process: true`): no engine thread; a task of the event loop reads
the core's outputs and feeds the streams. Same outputs as the in-process engine, cancellation frees the blocks,
stats work from the loop and from other threads, a second event loop takes the reading over, the wrapped LLM is
refused while attached and usable again after shutdown, and a killed core fails every stream within seconds."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

from weavelm import LLM, SamplingParams
from weavelm.core.async_llm import AsyncLLM
from weavelm.errors import EngineDeadError, EngineError
from tests.test_engine_process import ENGINE, child_alive, core_pid

os.environ.setdefault("WEAVELM_NUM_THREADS", "1")  # inherited by the core processes
PROMPTS = [[5, 6, 7, 8], [21, 22], list(range(40, 60)), [3]]


def params(i: int) -> SamplingParams:
    if i % 2:
        return SamplingParams(max_tokens=7, temperature=0.9, top_k=50, seed=100 + i, ignore_eos=True)
    return SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def inproc(tiny_llama):
    llm = LLM(model=tiny_llama, **ENGINE)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def mp(tiny_llama):
    llm = LLM(model=tiny_llama, engine_process=True, **ENGINE)
    yield llm
    llm.shutdown()


async def collect(engine: AsyncLLM, prompt, sp: SamplingParams, rid: str | None = None) -> tuple:
    ids, text, finish = [], "", None
    async for out in engine.generate(prompt, sp, rid, delta=True):
        comp = out.outputs[0]
        ids += comp.token_ids
        text += comp.text
        finish = comp.finish_reason
    return ids, text, finish


def test_reads_in_the_event_loop_and_matches_in_process(inproc, mp):
    engine = AsyncLLM.from_llm(mp)
    try:
        assert engine._reader_mode and engine._thread is None

        async def run():
            return await asyncio.gather(*(collect(engine, p, params(i)) for i, p in enumerate(PROMPTS * 3)))

        got = asyncio.run(run())
        want = [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason)
                for o in inproc.generate(PROMPTS * 3, [params(i) for i in range(len(PROMPTS) * 3)])]
        assert got == want
        assert not [t for t in threading.enumerate() if t.name == "weavelm-engine-loop"]

        async def n2():  # n > 1 fans out in the frontend and merges back into one stream
            sp = SamplingParams(max_tokens=5, temperature=0.8, seed=3, n=2, ignore_eos=True)
            outs = [o async for o in engine.generate([5, 6, 7], sp)]
            return sorted(len(c.token_ids) for c in outs[-1].outputs), outs[-1].finished

        assert asyncio.run(n2()) == ([5, 5], True)  # a second event loop took the reading over
        # that loop has ended: blocking calls read the core themselves again
        assert mp.get_stats().num_running_reqs == 0
        assert len(mp.generate([[5, 6]], params(0))[0].outputs[0].token_ids) == 7
    finally:
        engine.shutdown()


def test_cancel_frees_blocks_and_stats_work_from_any_thread(mp):
    engine = AsyncLLM.from_llm(mp)
    try:
        async def run():
            long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
            task = asyncio.ensure_future(collect(engine, [5, 6, 7], long))
            while engine.num_unfinished == 0 or (await engine.get_stats()).num_running_reqs == 0:
                await asyncio.sleep(0.01)
            # a blocking call from another thread waits for this loop to file its result
            stats = await asyncio.get_running_loop().run_in_executor(None, mp.get_stats)
            assert stats.num_running_reqs == 1 and stats.num_used_blocks > 0
            with pytest.raises(EngineError, match="await"):  # from the reading loop itself it would hang
                mp.get_stats()
            with pytest.raises(EngineError, match="AsyncLLM"):
                mp.generate([[1, 2]], SamplingParams(max_tokens=2))
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(200):
                stats = await engine.get_stats()
                if stats.num_used_blocks == 0:
                    break
                await asyncio.sleep(0.01)
            return stats

        stats = asyncio.run(run())
        assert (stats.num_running_reqs, stats.num_waiting_reqs, stats.num_used_blocks) == (0, 0, 0)
    finally:
        engine.shutdown()
    # shut down, the AsyncLLM gives the reading back: the LLM steps again
    assert mp.generate([[5, 6]], SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0].finish_reason == \
        "length"


def test_killed_core_fails_every_stream(tiny_llama):
    llm = LLM(model=tiny_llama, engine_process=True, **ENGINE)
    pid = core_pid(llm)
    engine = AsyncLLM.from_llm(llm)
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
        llm.shutdown()
    assert not child_alive(pid)


def test_health_notices_a_dead_core_before_any_request(tiny_llama):
    engine = AsyncLLM(model=tiny_llama, engine_process=True, **ENGINE)
    pid = engine.engine.client.proc.pid
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
