"""What chat and completions share once their requests are built: starting the generation, streaming its deltas as
server-sent events (usage, errors, `[DONE]`), or answering the whole response. An endpoint supplies only a
`ResponseView` that formats its own chunks and responses."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from weavelm.core.outputs import RequestOutput
from weavelm.core.request import SamplingParams
from weavelm.errors import EngineError, RequestError
from weavelm.serve.errors import APIError, bad_request, engine_unavailable
from weavelm.serve.generation import Generation, check_finished, completed
from weavelm.serve.protocol import UsageInfo
from weavelm.serve.serving import DONE, EventStream, sse, unless_disconnected


class ResponseView(ABC):
    """Formats one HTTP request's outputs. `req` is the API request (its `n`, `stream`, `stream_options`)."""

    req: Any

    def opening_events(self) -> list[str]:
        """Events sent before any output (chat's role deltas)."""
        return []

    @abstractmethod
    def delta_event(self, index: int, out: RequestOutput, first: bool) -> str | None:
        """The event of choice `index`'s delta `out` (`first`: its first), or None to send nothing."""

    @abstractmethod
    def usage_event(self, usage: UsageInfo) -> str:
        """The last event when the client asked for usage."""

    @abstractmethod
    def response(self, finals: list[RequestOutput], usage: UsageInfo) -> BaseModel:
        """The whole response of a non-streaming request."""


async def respond(gen: Generation, prompts: list[Any], params: list[SamplingParams], view: ResponseView,
                  raw: Request, renames: dict[str, str] | None = None) -> Response:
    """Start `gen` (one engine request per prompt) and answer: an event stream, or the whole response."""
    try:
        await gen.start(prompts, params)
    except RequestError as e:
        raise bad_request(e, renames) from None
    except EngineError as e:
        raise engine_unavailable(e) from None
    if view.req.stream:
        return EventStream(stream_events(gen, view), gen.close)
    try:
        return await unless_disconnected(raw, _complete(gen, view))
    finally:
        gen.close()


async def _complete(gen: Generation, view: ResponseView) -> JSONResponse:
    finals = await completed(gen)
    n = view.req.n
    prompt_tokens = sum(len(out.prompt_token_ids) for out in finals[::n])
    completion_tokens = sum(len(out.outputs[0].token_ids) for out in finals)
    usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=prompt_tokens + completion_tokens)
    return JSONResponse(view.response(finals, usage).model_dump())


async def stream_events(gen: Generation, view: ResponseView) -> AsyncIterator[str]:
    """Every event of a streamed response, ending with `data: [DONE]`: requests aborted by the server's shutdown
    end with finish_reason "abort", a failed one or a dead engine with an error event."""
    req = view.req
    seen: set[int] = set()
    prompt_tokens = completion_tokens = 0
    try:
        for event in view.opening_events():
            yield event
        async for index, out in gen.deltas():
            first = index not in seen
            seen.add(index)
            completion_tokens += len(out.outputs[0].token_ids)
            if first and index % req.n == 0:
                prompt_tokens += len(out.prompt_token_ids)
            if out.finished and out.outputs[0].finish_reason != "abort":
                check_finished(out)
            event = view.delta_event(index, out, first)
            if event is not None:
                yield event
        if req.stream_options and req.stream_options.include_usage:
            yield view.usage_event(UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                             total_tokens=prompt_tokens + completion_tokens))
    except APIError as e:
        yield sse(e.body())
    except EngineError as e:
        yield sse(engine_unavailable(e).body())
    yield DONE
