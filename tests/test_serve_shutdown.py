"""SIGTERM during load: the server stops accepting, lets a short in-flight request finish, aborts the long ones
at the shutdown timeout (their streams end with finish_reason "abort" and [DONE]), and exits 0 without leaving a
process behind."""

import asyncio
import signal
import time

import httpx
import psutil
import pytest

from tests.serve_utils import ServerProcess, sse_events

TIMEOUT = 1.5


async def _drive(url: str, proc) -> tuple[list, list, float]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        started = asyncio.Event()
        counts = {"long": 0}

        async def stream(max_tokens: int, long: bool) -> list:
            body = {"prompt": "Tell me everything", "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True}
            lines = []
            try:
                async with http.stream("POST", "/v1/completions", json=body) as resp:
                    async for line in resp.aiter_lines():
                        lines.append(line)
                        if long and line.startswith("data: {") and len(lines) == 1:
                            counts["long"] += 1
                            if counts["long"] == 24:
                                started.set()
            except httpx.TransportError:  # cut off when the server gave up on it
                pass
            return sse_events(lines)

        long = [asyncio.create_task(stream(480, True)) for _ in range(24)]
        await started.wait()
        short = asyncio.create_task(stream(6, False))
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        refused = False
        try:
            await http.get("/health")
        except httpx.TransportError:
            refused = True
        assert refused, "the server still accepts connections after SIGTERM"
        results = await asyncio.gather(*long)
        return await short, results, t0


@pytest.mark.parametrize("layout", [("--set", "engine_process=false"), ("--set", "engine_process=true"),
                                    ("--api-server-count", "2")],
                         ids=["core-thread", "core-process", "two-api-servers"])
def test_sigterm_during_load_exits_0_within_the_timeout(smol_tokenizer_model, layout):
    server = ServerProcess(smol_tokenizer_model, "--shutdown-timeout", str(TIMEOUT), *layout)
    try:
        children = psutil.Process(server.proc.pid).children(recursive=True)
        short, long, t0 = asyncio.run(_drive(server.url, server.proc))
        code = server.proc.wait(TIMEOUT + 20)
        elapsed = time.monotonic() - t0
        assert code == 0, server.output()
        assert elapsed < TIMEOUT + 15
        assert short[-1] == "[DONE]" and short[-2]["choices"][0]["finish_reason"] == "length"
        # past the timeout each stream still ends properly: a last chunk with finish_reason "abort", then [DONE]
        assert all(events and events[-1] == "[DONE]" for events in long), [e[-2:] for e in long]
        assert not [e for events in long for e in events if isinstance(e, dict) and "error" in e]
        aborted = [events for events in long if events[-2]["choices"][0]["finish_reason"] == "abort"]
        assert aborted, "every 480-token request finished inside the shutdown timeout; nothing was aborted"
        assert "Traceback" not in server.output(), server.output()[-3000:]
        _, alive = psutil.wait_procs(children, timeout=5)  # helpers (resource tracker) end on the server's exit
        assert not [c for c in alive if c.status() != psutil.STATUS_ZOMBIE], [c.cmdline() for c in alive]
    finally:
        server.stop()
