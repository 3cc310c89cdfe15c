"""Issue 24 #7: a frozen engine core (SIGSTOP) used to block `generate` forever; now a core that sends nothing for
`engine_iteration_timeout_s` while requests wait on it ends in EngineDeadError naming its process, for `LLM.generate`
and for an AsyncLLM stream, and shutdown leaves no process behind."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from weavelm import LLM, SamplingParams
from weavelm.core.async_llm import AsyncLLM
from weavelm.errors import EngineDeadError
from tests.test_engine_process import ENGINE, child_alive


def test_a_frozen_core_ends_in_engine_dead_error_at_the_deadline(tiny_llama):
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    llm = LLM(model=tiny_llama, engine_process=True, engine_iteration_timeout_s=1.5, **ENGINE)
    pid = llm.engine.client.core_pid
    try:
        assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))[0].finished
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError, match=f"pid {pid}.*sent nothing for 1.5 s"):
            llm.generate([[5, 6, 7]], long)
        assert time.monotonic() - t0 < 10
    finally:
        llm.shutdown()
    assert not child_alive(pid)

    engine = AsyncLLM(model=tiny_llama, engine_process=True, engine_iteration_timeout_s=1.5, **ENGINE)
    pid = engine.client.core_pid
    try:
        async def run():
            assert [o async for o in engine.generate([5, 6, 7], SamplingParams(max_tokens=2))][-1].finished
            os.kill(pid, signal.SIGSTOP)
            stream = await engine.add_request([5, 6, 7], long, delta=True)
            with pytest.raises(EngineDeadError, match="sent nothing"):
                async for _ in stream:
                    pass

        asyncio.run(asyncio.wait_for(run(), 15))
    finally:
        engine.shutdown()
    assert not child_alive(pid)
