"""The server's log lines (logger `weavelm.serve`), as vLLM logs: one line per finished request (its id, prompt and
output tokens, latency, finish reason) and, every `interval` seconds while requests run, the throughput line of
vLLM's `LoggingStatLogger` (prompt and generation tokens/s over the interval, running and waiting requests, KV-cache
usage, prefix-cache hit rate)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from weavelm.core.async_llm import RequestStream
from weavelm.core.outputs import RequestOutput

logger = logging.getLogger("weavelm.serve")
LOG_INTERVAL_S = 10.0


class RequestLog:
    """An output observer (see `AsyncLLM.output_observer`) that logs finished requests and starts the periodic
    throughput line while there is work; `then` is called after it with the same arguments (the metrics)."""

    def __init__(self, engine: Any, then: Callable | None = None, interval: float = LOG_INTERVAL_S):
        self.engine = engine
        self.then = then
        self.interval = interval
        self.prompt_tokens = 0  # since the last throughput line
        self.generation_tokens = 0
        self.last_log = time.perf_counter()
        self._task: asyncio.Task | None = None

    def __call__(self, stream: RequestStream, out: RequestOutput, new_tokens: int, previous: float | None,
                 now: float) -> None:
        self.generation_tokens += new_tokens
        if self._task is None or self._task.done():
            self.last_log = now
            self._task = asyncio.get_running_loop().create_task(self._throughput_loop())
        if out.finished:
            self.prompt_tokens += len(out.prompt_token_ids)
            reason = out.outputs[0].finish_reason if out.outputs else None
            logger.info("Finished request %s: prompt_tokens=%d, output_tokens=%d, latency=%.3fs, "
                        "finish_reason=%s", stream.request_id, len(out.prompt_token_ids), stream.num_output_tokens,
                        now - stream.arrival, reason)
        if self.then is not None:
            self.then(stream, out, new_tokens, previous, now)

    async def _throughput_loop(self) -> None:
        """Log every `interval` seconds; ends after an interval with nothing generated and nothing running."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                stats = await self.engine.get_stats()
            except Exception:  # the engine is gone: nothing to report
                return
            if not self.log_throughput(stats):
                return

    def log_throughput(self, stats: Any) -> bool:
        """Log vLLM's throughput line for the interval just ended; False when it was idle (nothing logged)."""
        now = time.perf_counter()
        elapsed = max(now - self.last_log, 1e-9)
        busy = self.prompt_tokens or self.generation_tokens or stats.num_running_reqs or stats.num_waiting_reqs
        if busy:
            logger.info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                        "Running: %d reqs, Waiting: %d reqs, GPU KV cache usage: %.1f%%, Prefix cache hit rate: "
                        "%.1f%%", self.prompt_tokens / elapsed, self.generation_tokens / elapsed,
                        stats.num_running_reqs, stats.num_waiting_reqs, stats.kv_cache_usage * 100,
                        stats.prefix_cache_hit_rate * 100)
        self.prompt_tokens = self.generation_tokens = 0
        self.last_log = now
        return bool(busy)
