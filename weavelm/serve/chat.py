"""`POST /v1/chat/completions`: messages rendered by the chat template, x `n` choices, streamed or not."""

from __future__ import annotations

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
from weavelm.serve.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                                    ChatLogProbs, ChatMessage, ChatResponseMessage, ChatStreamChoice,
                                    ChatTokenLogprob, DeltaMessage, TopLogprob, UsageInfo)
from weavelm.serve.serving import ServeState, position_logprobs, sse
from weavelm.serve.streaming import ResponseView, respond

RENAMES = {"prompt": "messages", "prompt_token_ids": "messages", "logprobs": "top_logprobs"}


def conversation(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The API's messages as the chat template's conversation ({"role", "content"} with text content)."""
    return [{"role": m.role, "content": _content(m.content)} for m in messages]


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
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestError("top_logprobs: needs logprobs: true")
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        base = build_params(req, max_tokens if max_tokens is not None else 1, top_n, state.sampling_defaults)
        prompt = await state.prompts.chat(conversation(req.messages), req.add_generation_prompt is not False)
        if max_tokens is None:  # the rest of the context, as vLLM does
            base.max_tokens = max(1, state.engine.max_model_len - len(prompt["prompt_token_ids"]))
        else:  # vLLM's 400 for a completion that cannot fit the context
            check_context_length(state.engine.max_model_len, len(prompt["prompt_token_ids"]), max_tokens)
    except RequestError as e:
        raise bad_request(e, renames) from None
    gen = Generation(state.engine, f"chatcmpl-{uuid.uuid4().hex}", lora, state.live)
    view = _View(state, req, gen.request_id, top_n)
    return await respond(gen, [prompt] * req.n, [child_params(base, j) for j in range(req.n)], view, raw, renames)


class _View(ResponseView):
    def __init__(self, state: ServeState, req: ChatCompletionRequest, request_id: str, top_n: int | None):
        self.state, self.req, self.id, self.top_n = state, req, request_id, top_n
        self.model = state.response_model(req.model)
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
        return sse(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices,
                                       usage=usage))

    def opening_events(self) -> list[str]:
        return [self.chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=self.echo))])
                for i in range(self.req.n)]

    def delta_event(self, index: int, out: RequestOutput, first: bool) -> str | None:
        comp = out.outputs[0]
        finish = openai_finish_reason(comp.finish_reason)
        if comp.text or finish or comp.token_ids and self.top_n is not None:
            return self.chunk([ChatStreamChoice(
                index=index, delta=DeltaMessage(content=comp.text or None if finish else comp.text),
                logprobs=self.logprobs(out), finish_reason=finish, stop_reason=comp.stop_reason)])
        return None

    def usage_event(self, usage: UsageInfo) -> str:
        return self.chunk([], usage)

    def response(self, finals: list[RequestOutput], usage: UsageInfo) -> ChatCompletionResponse:
        choices = [ChatChoice(index=i, message=ChatResponseMessage(content=self.echo + out.outputs[0].text),
                              logprobs=self.logprobs(out),
                              finish_reason=openai_finish_reason(out.outputs[0].finish_reason),
                              stop_reason=out.outputs[0].stop_reason)
                   for i, out in enumerate(finals)]
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                      usage=usage)
