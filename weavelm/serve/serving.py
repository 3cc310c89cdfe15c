"""What every endpoint shares: the server's state (engine, names, key, limits, metrics), admission (model name,
health, waiting limit), server-sent events, client-disconnect handling and logprob formatting."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from weavelm.core.async_llm import AsyncLLM
from weavelm.serve.errors import APIError
from weavelm.serve.metrics import ServerMetrics
from weavelm.serve.prompts import PromptPreparer
from weavelm.tools.settings import ToolSettings

DONE = "data: [DONE]\n\n"
MIN_LOGPROB = -9999.0  # what -inf is sent as (JSON has no infinity), as vLLM does


@dataclass
class ServeState:
    """One server: its engine and settings. `max_waiting`: most requests waiting for their first output before
    new ones get 429 (None: no limit). `live`: the generations of requests in flight (`abort_all` ends them)."""

    engine: AsyncLLM
    model_names: list[str]
    api_key: str | None = None
    max_waiting: int | None = None
    metrics: ServerMetrics = None  # type: ignore[assignment]
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    adapters: dict[str, Any] = field(default_factory=dict)  # served LoRA adapters: name -> LoRARequest
    prompts: PromptPreparer = None  # type: ignore[assignment]
    live: set = field(default_factory=set)
    tools: ToolSettings = field(default_factory=ToolSettings)  # tool calling and reasoning parsers (chat)

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def admit(self, model: str | None, num_requests: int) -> Any:
        """Raise the API error a new request of `num_requests` engine requests gets, if any; else the LoRA
        adapter that `model` names (None: the base model)."""
        if model is not None and model not in self.model_names and model not in self.adapters:
            raise APIError(404, f"The model `{model}` does not exist; this server serves "
                                f"{', '.join([*self.model_names, *self.adapters])}", param="model",
                           code="model_not_found")
        self.engine.check_health()
        if self.max_waiting is not None and num_requests > self.max_waiting:
            raise APIError(400, f"this request has {num_requests} completions (prompts x n) but "
                                f"--max-waiting-requests is {self.max_waiting}: it could never be admitted; "
                                f"send at most {self.max_waiting} at once", param="n")
        if self.max_waiting is not None and self.engine.num_waiting + num_requests > self.max_waiting:
            raise APIError(429, f"too many requests waiting ({self.engine.num_waiting}, limit {self.max_waiting});"
                                f" retry later", code="rate_limit_exceeded")
        return self.adapters.get(model) if model is not None else None

    async def refresh_adapters(self) -> None:
        """Take the served LoRA adapters from the engine core, which holds those loaded or unloaded at run time
        (by any API server). Nothing to ask without LoRA."""
        if self.engine.config.lora is not None:
            self.adapters = await self.engine.lora_adapters()

    async def refresh_adapters_for(self, model: str | None) -> None:
        """`refresh_adapters` before a request whose `model` may name an adapter (not the base model's names)."""
        if model is not None and model not in self.model_names:
            await self.refresh_adapters()

    def response_model(self, model: str | None) -> str:
        """The `model` of a response: the adapter's name for a LoRA adapter, else the served name."""
        return model if model is not None and model in self.adapters else self.model_name

    def abort_all(self) -> None:
        """Abort every request in flight: streams end with finish_reason "abort", others answer 503."""
        for gen in list(self.live):
            gen.abort()


def sse(chunk: BaseModel | dict) -> str:
    body = chunk.model_dump_json() if isinstance(chunk, BaseModel) else _json(chunk)
    return f"data: {body}\n\n"


def _json(obj: dict) -> str:
    import json
    return json.dumps(obj, ensure_ascii=False)


class EventStream(StreamingResponse):
    """A server-sent-event response that runs `on_close` however it ends: finished, the client gone (Starlette
    cancels the body), or the server shutting down. Covers a body never started, which a generator's own
    `finally` would miss."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream")
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def unless_disconnected(request: Request, work: Awaitable[Response]) -> Response:
    """Run a non-streaming handler's work; if the client disconnects first, cancel it (the caller's `finally`
    aborts its requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    return Response(status_code=499)


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def token_text(tokenizer: Any, token_id: int, logprob: Any = None) -> str:
    decoded = getattr(logprob, "decoded_token", None)
    if decoded is not None:
        return decoded
    return tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"


def position_logprobs(tokenizer: Any, token_ids: list[int], entries: list[Any] | None, top_n: int
                      ) -> list[tuple[str, float, list[tuple[str, float]]]]:
    """Per output token: (its text, its logprob, the top `top_n` alternatives as (text, logprob)). An entry is
    either the sampled token's logprob (a float) or vLLM's {token_id: Logprob} of the sampled and top tokens."""
    result = []
    for tid, entry in zip(token_ids, entries or []):
        if isinstance(entry, dict):
            ranked = sorted(entry.items(), key=lambda kv: -float(kv[1]))[:top_n]
            own = entry.get(tid)
            value = float(own) if own is not None else math.nan
            tops = [(token_text(tokenizer, t, lp), _finite(float(lp))) for t, lp in ranked]
        else:
            value = float(entry)
            tops = [(token_text(tokenizer, tid), _finite(value))][:top_n]
        result.append((token_text(tokenizer, tid, entry.get(tid) if isinstance(entry, dict) else None),
                       _finite(value), tops))
    return result


def _finite(x: float) -> float:
    return x if math.isfinite(x) else MIN_LOGPROB
