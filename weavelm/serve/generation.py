"""One HTTP request's engine requests (prompts x n completions): added together (all or none), streamed as one
merged sequence of deltas, aborted together when the client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from weavelm.core.async_llm import AsyncLLM, RequestStream
from weavelm.core.outputs import RequestOutput
from weavelm.core.request import SamplingParams
from weavelm.errors import EngineError
from weavelm.serve.errors import APIError, engine_unavailable


class Generation:
    """Choice `i` is the request of `prompts[i]` with `params[i]`, all on `lora_request` (None: the base model)."""

    def __init__(self, engine: AsyncLLM, request_id: str, lora_request: Any = None, live: set | None = None):
        self.engine = engine
        self.request_id = request_id
        self.lora_request = lora_request
        self.streams: list[RequestStream] = []
        self._live = live if live is not None else set()  # the server's set of generations in flight

    async def start(self, prompts: list[Any], params: list[SamplingParams]) -> None:
        """Add every choice's request or none: a RequestError (or EngineDeadError) aborts those already added."""
        self._live.add(self)
        try:
            for i, (prompt, sp) in enumerate(zip(prompts, params)):
                self.streams.append(await self.engine.add_request(prompt, sp, f"{self.request_id}-{i}", delta=True,
                                                                 lora_request=self.lora_request))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Abort whatever has not finished (idempotent)."""
        self._live.discard(self)
        for stream in self.streams:
            self.engine.release(stream)

    def abort(self) -> None:
        """Abort every choice but keep reading: each stream still gets its final output (finish_reason "abort")."""
        self.engine.abort_nowait([s.request_id for s in self.streams if not s.finished])

    async def deltas(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, delta output) as they come, across choices, until every choice finished."""
        if len(self.streams) == 1:
            async for out in self.streams[0]:
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    queue.put_nowait((index, out))
            except BaseException as e:  # handed to the consumer, who raises it
                queue.put_nowait((index, e))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self.streams)]
        remaining = len(tasks)
        try:
            while remaining:
                index, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    remaining -= 1
                yield index, item
        finally:
            for task in tasks:
                task.cancel()

    async def finals(self) -> list[RequestOutput]:
        """Each choice's output with its whole text, token ids and logprobs (deltas joined)."""
        joined: list[RequestOutput | None] = [None] * len(self.streams)
        async for index, out in self.deltas():
            prev = joined[index]
            if prev is None:
                joined[index] = out
                continue
            comp, new = prev.outputs[0], out.outputs[0]
            comp.text += new.text
            comp.token_ids = comp.token_ids + new.token_ids
            if new.logprobs is not None:
                comp.logprobs = (comp.logprobs or []) + list(new.logprobs)
            comp.finish_reason, comp.stop_reason = new.finish_reason, new.stop_reason
            prev.finished, prev.error, prev.num_cached_tokens = out.finished, out.error, out.num_cached_tokens
        return [o for o in joined if o is not None]


async def completed(gen: Generation) -> list[RequestOutput]:
    """Every choice's final output for a non-streaming response: a dead engine is a 503, a failed or aborted
    choice raises through `check_finished`."""
    try:
        finals = await gen.finals()
    except EngineError as e:
        raise engine_unavailable(e) from None
    for out in finals:
        check_finished(out)
    return finals


def check_finished(out: RequestOutput) -> None:
    """Raise for a choice that the engine failed (500) or aborted (503: only the server's shutdown does)."""
    reason = out.outputs[0].finish_reason if out.outputs else None
    if out.error is not None or reason == "error":
        raise APIError(500, f"the engine failed this request: {out.error}")
    if reason == "abort":
        raise APIError(503, "the request was aborted: the server is shutting down", code="aborted")


def openai_finish_reason(reason: str | None) -> str | None:
    """The OpenAI finish_reason of an engine one: "stop", "length" and vLLM's "abort" as is, anything else (an
    error) "stop"."""
    return reason if reason in (None, "stop", "length", "abort") else "stop"
