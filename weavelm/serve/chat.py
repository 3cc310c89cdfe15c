"""`POST /v1/chat/completions`: messages rendered by the tokenizer's chat template, x `n` choices, streamed or not."""

from __future__ import annotations

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
from weavelm.serve.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                                    ChatLogProbs, ChatMessage, ChatResponseMessage, ChatStreamChoice,
                                    ChatTokenLogprob, DeltaMessage, TopLogprob, UsageInfo)
from weavelm.serve.serving import DONE, EventStream, ServeState, position_logprobs, sse, unless_disconnected

RENAMES = {"prompt": "messages", "prompt_token_ids": "messages", "logprobs": "top_logprobs"}


def render_chat(tokenizer: Any, messages: list[ChatMessage], add_generation_prompt: bool = True) -> dict[str, Any]:
    """The engine prompt of a conversation: the chat template's text and its token ids (no special tokens added
    on top of the template's own, as `LLM.chat` does). Raises RequestError."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise RequestError("messages: this model's tokenizer has no chat template; use /v1/completions")
    if not messages:
        raise RequestError("messages: give at least one message")
    conversation = [{"role": m.role, "content": _content(m.content)} for m in messages]
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                             tokenize=False)
        ids = list(tokenizer.encode(text, add_special_tokens=False))
    except Exception as e:  # the template's own checks (roles, order) and unencodable text
        raise RequestError(f"messages: the chat template cannot render them ({type(e).__name__}: {e})") from e
    return {"prompt": text, "prompt_token_ids": ids}


def _content(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part.text for part in content)


async def create_chat_completion(state: ServeState, req: ChatCompletionRequest, raw: Request) -> Response:
    check_unsupported(req)
    lora = state.admit(req.model, req.n)
    renames = dict(RENAMES, max_tokens="max_completion_tokens") if req.max_completion_tokens is not None \
        else RENAMES
    try:
        prompt = render_chat(state.tokenizer, req.messages, req.add_generation_prompt is not False)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:  # the rest of the context, as vLLM does
            max_tokens = max(1, state.engine.max_model_len - len(prompt["prompt_token_ids"]))
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestError("top_logprobs: needs logprobs: true")
        base = build_params(req, max_tokens, top_n, state.sampling_defaults)
    except RequestError as e:
        raise bad_request(e, renames) from None
    gen = Generation(state.engine, f"chatcmpl-{uuid.uuid4().hex}", lora)
    try:
        await gen.start([prompt] * req.n, [child_params(base, j) for j in range(req.n)])
    except RequestError as e:
        raise bad_request(e, renames) from None
    except EngineError as e:
        raise engine_unavailable(e) from None
    view = _View(state, req, gen.request_id, top_n)
    if req.stream:
        return EventStream(_stream(gen, view), gen.close)
    try:
        return await unless_disconnected(raw, _complete(gen, view))
    finally:
        gen.close()


class _View:
    def __init__(self, state: ServeState, req: ChatCompletionRequest, request_id: str, top_n: int | None):
        self.state, self.req, self.id, self.top_n = state, req, request_id, top_n
        self.created = int(time.time())
        last = req.messages[-1] if req.messages else None
        self.echo = _content(last.content) if req.echo and last is not None and last.role == "assistant" else ""

    def logprobs(self, out: RequestOutput) -> ChatLogProbs | None:
        if self.top_n is None:
            return None
        comp = out.outputs[0]
        content = []
        for text, value, tops in position_logprobs(self.state.tokenizer, comp.token_ids, comp.logprobs,
                                                   self.top_n):
            content.append(ChatTokenLogprob(
                token=text, logprob=value, bytes=list(text.encode("utf-8", "replace")),
                top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(t.encode("utf-8", "replace")))
                              for t, lp in tops]))
        return ChatLogProbs(content=content)

    def chunk(self, choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
        return sse(ChatCompletionChunk(id=self.id, created=self.created, model=self.state.model_name,
                                       choices=choices, usage=usage))


async def _complete(gen: Generation, view: _View) -> JSONResponse:
    finals = await completed(gen)
    prompt_tokens = len(finals[0].prompt_token_ids) if finals else 0
    completion_tokens = sum(len(out.outputs[0].token_ids) for out in finals)
    choices = [ChatChoice(index=i, message=ChatResponseMessage(content=view.echo + out.outputs[0].text),
                          logprobs=view.logprobs(out), finish_reason=openai_finish_reason(out.outputs[0].finish_reason),
                          stop_reason=out.outputs[0].stop_reason)
               for i, out in enumerate(finals)]
    body = ChatCompletionResponse(id=view.id, created=view.created, model=view.state.model_name, choices=choices,
                                  usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                                  total_tokens=prompt_tokens + completion_tokens))
    return JSONResponse(body.model_dump())


async def _stream(gen: Generation, view: _View) -> AsyncIterator[str]:
    req = view.req
    prompt_tokens = completion_tokens = 0
    try:
        for i in range(req.n):
            yield view.chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=view.echo))])
        async for index, out in gen.deltas():
            prompt_tokens = len(out.prompt_token_ids)
            comp = out.outputs[0]
            completion_tokens += len(comp.token_ids)
            if out.finished:
                check_finished(out)
            finish = openai_finish_reason(comp.finish_reason)
            if comp.text or finish or comp.token_ids and view.top_n is not None:
                yield view.chunk([ChatStreamChoice(
                    index=index, delta=DeltaMessage(content=comp.text or None if finish else comp.text),
                    logprobs=view.logprobs(out), finish_reason=finish, stop_reason=comp.stop_reason)])
        if req.stream_options and req.stream_options.include_usage:
            yield view.chunk([], UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                           total_tokens=prompt_tokens + completion_tokens))
    except APIError as e:
        yield sse(e.body())
    except EngineError as e:
        yield sse(engine_unavailable(e).body())
    yield DONE
