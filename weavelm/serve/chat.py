"""`POST /v1/chat/completions`: messages rendered by the chat template, x `n` choices, streamed or not. With
`tools` or a reasoning parser, each choice's text goes through `weavelm.tools` (tool calls, reasoning_content)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import asdict
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from weavelm.core.chat_media import ChatMedia, flatten_chat_media, has_media
from weavelm.core.fanout import child_params
from weavelm.core.outputs import RequestOutput
from weavelm.core.request import StructuredOutputsParams
from weavelm.errors import RequestError
from weavelm.serve.errors import bad_request
from weavelm.serve.generation import Generation, openai_finish_reason
from weavelm.serve.params import build_params, check_context_length, check_unsupported
from weavelm.serve.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                                    ChatLogProbs, ChatMessage, ChatResponseMessage, ChatStreamChoice,
                                    ChatTokenLogprob, DeltaMessage, DeltaToolCall, ToolCall, TopLogprob,
                                    UsageInfo)
from weavelm.serve.serving import ServeState, position_logprobs, sse
from weavelm.serve.streaming import ResponseView, respond
from weavelm.tools.assemble import ChoiceStream, assemble
from weavelm.tools.choice import ToolPlan, plan_tools

RENAMES = {"prompt": "messages", "prompt_token_ids": "messages", "logprobs": "top_logprobs"}


def conversation(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The API's messages as the chat template's conversation ({"role", "content"} with text content, plus an
    assistant's `tool_calls` and a tool message's `tool_call_id` and `name`). Content with image parts stays a list
    of part dicts, for `flatten_chat_media`."""
    turns = []
    for m in messages:
        turn: dict[str, Any] = {"role": m.role, "content": _content(m.content)}
        if isinstance(m.content, list) and any(part.type != "text" for part in m.content):
            turn["content"] = [part.model_dump(exclude_none=True) for part in m.content]
        if m.tool_calls:
            turn["tool_calls"] = [_template_call(c) for c in m.tool_calls]
        for key in ("tool_call_id", "name"):
            if getattr(m, key) is not None:
                turn[key] = getattr(m, key)
        turns.append(turn)
    return turns


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    """An earlier tool call for the template: its arguments as a mapping when they are JSON text (as vLLM does;
    templates write them with `tojson`)."""
    function = call.get("function")
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        try:
            function = dict(function, arguments=json.loads(function["arguments"]))
        except ValueError:
            pass
        call = dict(call, function=function)
    return call


def _content(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part.text or "" for part in content if part.type == "text")


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
        plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls, state.tools.auto)
        base = build_params(req, max_tokens if max_tokens is not None else 1, top_n, state.sampling_defaults)
        if plan.schema is not None:
            if getattr(base, "structured_outputs", None) is not None:
                raise RequestError(f"tool_choice: {plan.mode} tool calls are held to their own JSON schema; drop "
                                   f"response_format / structured_outputs or use tool_choice \"auto\"")
            # compact JSON (", " and ": " separators): a call needs no other whitespace, and a weak model could
            # otherwise write whitespace until max_tokens
            base.structured_outputs = StructuredOutputsParams(json=plan.schema, disable_any_whitespace=True)
        turns = conversation(req.messages)
        media = ChatMedia(turns)
        if has_media(turns):
            engine = state.engine
            media = await asyncio.to_thread(  # images are decoded (and the processor loaded) off the event loop
                lambda: flatten_chat_media(turns, engine.processor.image_placeholder, engine.config.multimodal))
        prompt = media.add_to(await state.prompts.chat(media.conversation, req.add_generation_prompt is not False,
                                                       tools=plan.tools))
        if max_tokens is None:  # the rest of the context, as vLLM does
            base.max_tokens = max(1, state.engine.max_model_len - len(prompt["prompt_token_ids"]))
        else:  # vLLM's 400 for a completion that cannot fit the context
            check_context_length(state.engine.max_model_len, len(prompt["prompt_token_ids"]), max_tokens)
    except RequestError as e:
        raise bad_request(e, renames) from None
    gen = Generation(state.engine, f"chatcmpl-{uuid.uuid4().hex}", lora, state.live)
    view = _View(state, req, gen.request_id, top_n, plan)
    return await respond(gen, [prompt] * req.n, [child_params(base, j) for j in range(req.n)], view, raw, renames)


class _View(ResponseView):
    def __init__(self, state: ServeState, req: ChatCompletionRequest, request_id: str, top_n: int | None,
                 plan: ToolPlan):
        self.state, self.req, self.id, self.top_n, self.plan = state, req, request_id, top_n, plan
        # tool calls or reasoning to parse out of the text (else the text is the content, as it comes)
        self.parsed = plan.mode != "none" or state.tools.reasoning_parser is not None
        self.streams: dict[int, ChoiceStream] = {}
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

    def _stream(self, index: int) -> ChoiceStream:
        if index not in self.streams:
            tools = self.state.tools
            self.streams[index] = ChoiceStream(self.plan, tools.new_tool_parser(self.state.tokenizer),
                                               tools.new_reasoning_parser(self.state.tokenizer), self.req)
        return self.streams[index]

    def _finish(self, finish: str | None, tools_called: bool) -> str | None:
        """vLLM's finish_reason: "tool_calls" when a call ended the output (auto, required), else the engine's."""
        return "tool_calls" if finish == "stop" and tools_called and self.plan.mode in ("auto", "required") \
            else finish

    def delta_event(self, index: int, out: RequestOutput, first: bool) -> str | None:
        comp = out.outputs[0]
        finish = openai_finish_reason(comp.finish_reason)
        if self.parsed:
            stream = self._stream(index)
            piece = stream.feed(comp.text, final=finish is not None)
            if piece is None and not finish and not (comp.token_ids and self.top_n is not None):
                return None
            delta = DeltaMessage()
            if piece is not None:
                delta = DeltaMessage(content=piece.content, reasoning_content=piece.reasoning_content,
                                     tool_calls=[DeltaToolCall.model_validate(asdict(c)) for c in piece.tool_calls]
                                     or None)
            return self.chunk([ChatStreamChoice(
                index=index, delta=delta, logprobs=self.logprobs(out),
                finish_reason=self._finish(finish, stream.tools_called), stop_reason=comp.stop_reason)])
        if comp.text or finish or comp.token_ids and self.top_n is not None:
            return self.chunk([ChatStreamChoice(
                index=index, delta=DeltaMessage(content=comp.text or None if finish else comp.text),
                logprobs=self.logprobs(out), finish_reason=finish, stop_reason=comp.stop_reason)])
        return None

    def usage_event(self, usage: UsageInfo) -> str:
        return self.chunk([], usage)

    def message(self, text: str) -> tuple[ChatResponseMessage, bool]:
        """A choice's message, and whether it holds tool calls."""
        if not self.parsed:
            return ChatResponseMessage(content=self.echo + text), False
        tools, tokenizer = self.state.tools, self.state.tokenizer
        msg = assemble(text, self.plan, tools.new_tool_parser(tokenizer), tools.new_reasoning_parser(tokenizer),
                       self.req)
        content = self.echo + msg.content if msg.content is not None else (self.echo or None)
        calls = [ToolCall.model_validate(asdict(c)) for c in msg.tool_calls]
        return ChatResponseMessage(content=content, reasoning_content=msg.reasoning_content,
                                   tool_calls=calls), bool(calls)

    def response(self, finals: list[RequestOutput], usage: UsageInfo) -> ChatCompletionResponse:
        choices = []
        for i, out in enumerate(finals):
            message, called = self.message(out.outputs[0].text)
            choices.append(ChatChoice(
                index=i, message=message, logprobs=self.logprobs(out),
                finish_reason=self._finish(openai_finish_reason(out.outputs[0].finish_reason), called),
                stop_reason=out.outputs[0].stop_reason))
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                      usage=usage)
