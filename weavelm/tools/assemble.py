"""From a choice's generated text to the message the API returns: the reasoning split off (reasoning parser), then
the tool calls, by the plan's mode: `auto` through the tool parser, `required` from the JSON array its schema
held the output to, `named` with the output as the function's arguments. Whole (`assemble`) or streamed
(`ChoiceStream`, one per streamed choice), the pieces add up to the same message."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from weavelm.tools.calls import CallStreamer, call_from_object, split_objects
from weavelm.tools.choice import ToolPlan
from weavelm.tools.interfaces import (DeltaFunctionCall, DeltaMessage, DeltaToolCall, FunctionCall,
                                      ReasoningParser, ToolCall, ToolParser, tool_call_id)


@dataclass
class AssembledMessage:
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


def required_calls(text: str) -> list[ToolCall] | None:
    """The calls of a `tool_choice="required"` output (a JSON array of {"name", "parameters"}), or None when it is
    not one (cut off by max_tokens)."""
    try:
        items = json.loads(text)
    except ValueError:
        return None
    if not isinstance(items, list) or not items:
        return None
    calls = [call_from_object(item, ("parameters",)) for item in items]
    return None if any(c is None for c in calls) else calls


def assemble(text: str, plan: ToolPlan, tool_parser: ToolParser | None = None,
             reasoning_parser: ReasoningParser | None = None, request: Any = None) -> AssembledMessage:
    """The whole message of one choice's `text`."""
    reasoning = None
    content: str | None = text
    if reasoning_parser is not None:
        reasoning, content = reasoning_parser.extract_reasoning(text, request)
    text = content or ""
    if plan.mode == "auto" and tool_parser is not None:
        found = tool_parser.extract_tool_calls(text, request)
        if found.tools_called:
            return AssembledMessage(found.content, reasoning, found.tool_calls)
    elif plan.mode == "required":
        calls = required_calls(text)
        if calls is not None:
            return AssembledMessage(None, reasoning, calls)
    elif plan.mode == "named":
        return AssembledMessage(None, reasoning, [ToolCall(FunctionCall(plan.function, text))])
    return AssembledMessage(content, reasoning)


class ChoiceStream:
    """One streamed choice: `feed` each text delta, get the `DeltaMessage` to send (None: nothing yet). The last
    `feed` (`final`) also sends what the parsers held back (a partial tag that never completed)."""

    def __init__(self, plan: ToolPlan, tool_parser: ToolParser | None = None,
                 reasoning_parser: ReasoningParser | None = None, request: Any = None):
        self.plan, self.tool_parser, self.reasoning_parser, self.request = plan, tool_parser, reasoning_parser, \
            request
        self.text = ""  # the whole output so far
        self.content_text = ""  # its content part (after the reasoning), what the tool stage reads
        self.reasoning_sent = ""
        self.content_sent = ""
        self.tools_called = False
        self._required = CallStreamer(("parameters",))
        self._named_id: str | None = None

    def feed(self, delta_text: str, final: bool = False) -> DeltaMessage | None:
        previous = self.text
        self.text += delta_text
        out = DeltaMessage()
        if self.reasoning_parser is None:
            content_delta = delta_text
        else:
            piece = self.reasoning_parser.extract_reasoning_streaming(previous, self.text, delta_text,
                                                                      request=self.request)
            content_delta = ""
            if piece is not None:
                out.reasoning_content = piece.reasoning_content
                content_delta = piece.content or ""
            if final:
                reasoning, content = self.reasoning_parser.extract_reasoning(self.text, self.request)
                held = _rest(reasoning or "", self.reasoning_sent + (out.reasoning_content or ""))
                out.reasoning_content = (out.reasoning_content or "") + held or None
                content_delta += _rest(content or "", self.content_text + content_delta)
        self.reasoning_sent += out.reasoning_content or ""
        self._tools(content_delta, final, out)
        self.content_sent += out.content or ""
        self.tools_called = self.tools_called or bool(out.tool_calls)
        return None if out.is_empty() else out

    def _tools(self, delta: str, final: bool, out: DeltaMessage) -> None:
        previous = self.content_text
        self.content_text += delta
        mode = self.plan.mode
        if mode == "auto" and self.tool_parser is not None:
            if delta:
                piece = self.tool_parser.extract_tool_calls_streaming(previous, self.content_text, delta,
                                                                      request=self.request)
                if piece is not None:
                    out.content, out.tool_calls = piece.content, piece.tool_calls
            if final:
                found = self.tool_parser.extract_tool_calls(self.content_text, self.request)
                whole = (found.content or "") if found.tools_called else self.content_text
                out.content = ((out.content or "") + _rest(whole, self.content_sent + (out.content or ""))) \
                    or None
        elif mode == "required":
            body = self.content_text.lstrip()
            if body.startswith("["):
                out.tool_calls = self._required.update(split_objects(body[1:], ",")[0])
        elif mode == "named":
            if self._named_id is None and (delta or final):
                self._named_id = tool_call_id()
                out.tool_calls = [DeltaToolCall(0, self._named_id, "function",
                                                DeltaFunctionCall(self.plan.function, delta))]
            elif delta:
                out.tool_calls = [DeltaToolCall(0, function=DeltaFunctionCall(arguments=delta))]
        else:
            out.content = delta or None


def _rest(whole: str, sent: str) -> str:
    """What is left to send of `whole` after `sent` (nothing when the stream went another way)."""
    return whole[len(sent):] if whole.startswith(sent) else ""
