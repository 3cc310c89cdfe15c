"""`POST /v1/completions`: text or token-id prompts (one or a batch) x `n` choices, streamed or not."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from weavelm.core.outputs import RequestOutput
from weavelm.errors import EngineError, RequestError
from weavelm.serve.errors import APIError, bad_request, engine_unavailable
from weavelm.serve.generation import Generation, check_finished, completed, openai_finish_reason
from weavelm.core.fanout import child_params
from weavelm.serve.params import build_params, check_unsupported
from weavelm.serve.protocol import (CompletionChoice, CompletionLogProbs, CompletionRequest, CompletionResponse,
                                    UsageInfo)
from weavelm.serve.serving import DONE, EventStream, ServeState, position_logprobs, sse, unless_disconnected

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


def engine_prompts(prompt: Any) -> list[Any]:
    """The API's prompt forms as engine prompts: a str, a token-id list, or a list of either."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt or isinstance(prompt[0], int):
        return [{"prompt_token_ids": prompt}]
    return [p if isinstance(p, str) else {"prompt_token_ids": p} for p in prompt]


async def create_completion(state: ServeState, req: CompletionRequest, raw: Request) -> Response:
    check_unsupported(req)
    prompts = engine_prompts(req.prompt)
    lora = state.admit(req.model, len(prompts) * req.n)
    try:
        base = build_params(req, req.max_tokens if req.max_tokens is not None else DEFAULT_MAX_TOKENS,
                            req.logprobs, state.sampling_defaults)
    except RequestError as e:
        raise bad_request(e) from None
    gen = Generation(state.engine, f"cmpl-{uuid.uuid4().hex}", lora)
    try:
        await gen.start([p for p in prompts for _ in range(req.n)],
                        [child_params(base, j) for _ in prompts for j in range(req.n)])
    except RequestError as e:
        raise bad_request(e, {"prompt_token_ids": "prompt"}) from None
    except EngineError as e:
        raise engine_unavailable(e) from None
    view = _View(state, req, gen.request_id)
    if req.stream:
        return EventStream(_stream(gen, view, req), gen.close)
    try:
        return await unless_disconnected(raw, _complete(gen, view))
    finally:
        gen.close()


class _View:
    """Formats engine outputs as completion choices."""

    def __init__(self, state: ServeState, req: CompletionRequest, request_id: str):
        self.state, self.req, self.id = state, req, request_id
        self.created = int(time.time())
        self.top_n = req.logprobs
        self.offsets: dict[int, int] = {}
        self._event_head = (f'data: {{"id":{json.dumps(request_id)},"object":"text_completion","created":'
                            f'{self.created},"model":{json.dumps(state.model_name)},"choices":[{{"index":')

    def text_event(self, index: int, text: str) -> str:
        """The SSE event of a plain text delta (no logprobs, not finished): the JSON of
        `sse(CompletionResponse(..., choices=[CompletionChoice(index, text)]))`, written without building models:
        the streaming hot path, once per request per step."""
        return (f'{self._event_head}{index},"text":{json.dumps(text, ensure_ascii=False)},"logprobs":null,'
                f'"finish_reason":null,"stop_reason":null}}],"usage":null}}\n\n')

    def prompt_text(self, out: RequestOutput) -> str:
        if out.prompt is not None:
            return out.prompt
        tok = self.state.tokenizer
        return tok.decode(out.prompt_token_ids) if tok is not None else ""

    def choice(self, index: int, out: RequestOutput, first: bool) -> CompletionChoice:
        comp = out.outputs[0]
        prefix = self.prompt_text(out) if self.req.echo and first else ""
        logprobs = None
        if self.top_n is not None:
            self.offsets[index] = self.offsets.get(index, 0) + len(prefix)
            logprobs = self._logprobs(index, comp.token_ids, comp.logprobs)
        return CompletionChoice(index=index, text=prefix + comp.text, logprobs=logprobs,
                                finish_reason=openai_finish_reason(comp.finish_reason), stop_reason=comp.stop_reason)

    def _logprobs(self, index: int, token_ids: list[int], entries: list | None) -> CompletionLogProbs:
        result = CompletionLogProbs()
        offset = self.offsets.get(index, 0)
        for text, value, tops in position_logprobs(self.state.tokenizer, token_ids, entries, self.top_n):
            result.tokens.append(text)
            result.token_logprobs.append(value)
            result.top_logprobs.append(dict(tops) if self.top_n else None)
            result.text_offset.append(offset)
            offset += len(text)
        self.offsets[index] = offset
        return result


async def _complete(gen: Generation, view: _View) -> JSONResponse:
    finals = await completed(gen)
    n = view.req.n
    prompt_tokens = sum(len(out.prompt_token_ids) for out in finals[::n])
    completion_tokens = sum(len(out.outputs[0].token_ids) for out in finals)
    body = CompletionResponse(id=view.id, created=view.created, model=view.state.model_name,
                              choices=[view.choice(i, out, True) for i, out in enumerate(finals)],
                              usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                              total_tokens=prompt_tokens + completion_tokens))
    return JSONResponse(body.model_dump())


async def _stream(gen: Generation, view: _View, req: CompletionRequest) -> AsyncIterator[str]:
    seen: set[int] = set()
    prompt_tokens = completion_tokens = 0
    try:
        async for index, out in gen.deltas():
            first = index not in seen
            seen.add(index)
            completion_tokens += len(out.outputs[0].token_ids)
            if first and index % req.n == 0:
                prompt_tokens += len(out.prompt_token_ids)
            if out.finished:
                check_finished(out)
            elif view.top_n is None and not (req.echo and first):  # the common case, without models
                if out.outputs[0].text:
                    yield view.text_event(index, out.outputs[0].text)
                continue
            choice = view.choice(index, out, first)
            if choice.text or choice.finish_reason or (choice.logprobs and choice.logprobs.tokens):
                yield sse(CompletionResponse(id=view.id, created=view.created, model=view.state.model_name,
                                             choices=[choice]))
        if req.stream_options and req.stream_options.include_usage:
            usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                              total_tokens=prompt_tokens + completion_tokens)
            yield sse(CompletionResponse(id=view.id, created=view.created, model=view.state.model_name,
                                         choices=[], usage=usage))
    except APIError as e:
        yield sse(e.body())
    except EngineError as e:
        yield sse(engine_unavailable(e).body())
    yield DONE
