"""`POST /v1/completions`: text or token-id prompts (one or a batch) x `n` choices, streamed or not."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from weavelm.core.fanout import child_params
from weavelm.core.outputs import RequestOutput
from weavelm.errors import RequestError
from weavelm.serve.errors import bad_request
from weavelm.serve.generation import Generation, openai_finish_reason
from weavelm.serve.params import build_params, check_context_length, check_unsupported
from weavelm.serve.protocol import (CompletionChoice, CompletionLogProbs, CompletionRequest, CompletionResponse,
                                    UsageInfo)
from weavelm.serve.serving import ServeState, position_logprobs, sse
from weavelm.serve.streaming import ResponseView, respond

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
RENAMES = {"prompt_token_ids": "prompt"}


def api_prompts(prompt: Any) -> list[str | list[int]]:
    """The API's prompt forms as a list of prompts: a str, a token-id list, or a list of either."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt or isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


async def create_completion(state: ServeState, req: CompletionRequest, raw: Request) -> Response:
    check_unsupported(req)
    prompts = api_prompts(req.prompt)
    lora = state.admit(req.model, len(prompts) * req.n)
    try:
        base = build_params(req, req.max_tokens if req.max_tokens is not None else DEFAULT_MAX_TOKENS,
                            req.logprobs, state.sampling_defaults)
        for p in prompts:  # every size bound before any tokenizing
            if isinstance(p, str):
                state.prompts.check_text(p)
            else:
                state.prompts.check_ids(p)
        engine_prompts = [await state.prompts.prompt(p) for p in prompts]
        if req.max_tokens is not None:  # vLLM's 400 for a completion that cannot fit the context
            for p in engine_prompts:
                check_context_length(state.engine.max_model_len, len(p["prompt_token_ids"]), req.max_tokens)
    except RequestError as e:
        raise bad_request(e, RENAMES) from None
    gen = Generation(state.engine, f"cmpl-{uuid.uuid4().hex}", lora, state.live)
    view = _View(state, req, gen.request_id)
    return await respond(gen, [p for p in engine_prompts for _ in range(req.n)],
                         [child_params(base, j) for _ in engine_prompts for j in range(req.n)], view, raw, RENAMES)


class _View(ResponseView):
    """Formats engine outputs as completion choices."""

    def __init__(self, state: ServeState, req: CompletionRequest, request_id: str):
        self.state, self.req, self.id = state, req, request_id
        self.model = state.response_model(req.model)
        self.created = int(time.time())
        self.top_n = req.logprobs
        self.offsets: dict[int, int] = {}
        self._event_head = (f'data: {{"id":{json.dumps(request_id)},"object":"text_completion","created":'
                            f'{self.created},"model":{json.dumps(self.model)},"choices":[{{"index":')

    def text_event(self, index: int, text: str) -> str:
        """The SSE event of a plain text delta (no logprobs, not finished): the JSON of
        `sse(CompletionResponse(..., choices=[CompletionChoice(index, text)]))`, written without building models:
        the streaming hot path, once per request per step."""
        return (f'{self._event_head}{index},"text":{json.dumps(text, ensure_ascii=False)},"logprobs":null,'
                f'"finish_reason":null,"stop_reason":null}}],"usage":null}}\n\n')

    def delta_event(self, index: int, out: RequestOutput, first: bool) -> str | None:
        if not out.finished and self.top_n is None and not (self.req.echo and first):  # the common case
            return self.text_event(index, out.outputs[0].text) if out.outputs[0].text else None
        choice = self.choice(index, out, first)
        if choice.text or choice.finish_reason or (choice.logprobs and choice.logprobs.tokens):
            return sse(CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice]))
        return None

    def usage_event(self, usage: UsageInfo) -> str:
        return sse(CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[],
                                      usage=usage))

    def response(self, finals: list[RequestOutput], usage: UsageInfo) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model,
                                  choices=[self.choice(i, out, True) for i, out in enumerate(finals)], usage=usage)

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
