"""The two parser kinds of the chat server (vLLM's shapes): `ToolParser` turns a model's text into OpenAI tool
calls, `ReasoningParser` splits off its reasoning (`<think>...</think>`). Both are registered plugin kinds
(`tool_parser`, `reasoning_parser`) and exported from `weavelm.plugin`.

A parser object serves one response choice: the server builds one per choice, so a streaming parser may keep
state between calls. Streaming calls get the text so far (`current_text`), what it was before (`previous_text`)
and the new piece (`delta_text`); they return the `DeltaMessage` to send, or None to send nothing yet."""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from weavelm.core.interfaces import Component


def tool_call_id() -> str:
    """A fresh tool-call id, in vLLM's form."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass
class FunctionCall:
    """A called function: its name and its arguments as JSON text (OpenAI's shape)."""

    name: str
    arguments: str


@dataclass
class ToolCall:
    function: FunctionCall
    id: str = field(default_factory=tool_call_id)
    type: str = "function"


@dataclass
class ExtractedToolCalls:
    """What `ToolParser.extract_tool_calls` found: `tools_called` with the `tool_calls`, and the text left as the
    message's `content` (None when there is none)."""

    tools_called: bool
    tool_calls: list[ToolCall]
    content: str | None = None


@dataclass
class DeltaFunctionCall:
    name: str | None = None
    arguments: str | None = None


@dataclass
class DeltaToolCall:
    """One piece of tool call `index` in a stream: the first carries `id`, `type` and the function's `name`, the
    next ones pieces of its `arguments` (their concatenation is the arguments' JSON text)."""

    index: int
    id: str | None = None
    type: str | None = None
    function: DeltaFunctionCall | None = None


@dataclass
class DeltaMessage:
    """A streamed choice's delta: new content, reasoning content and tool-call pieces."""

    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not self.content and not self.reasoning_content and not self.tool_calls


class ToolParser(Component, ABC):
    """Finds the tool calls in a model's output (selected with `--tool-call-parser NAME`, used for
    `tool_choice="auto"`). `tokenizer` is the model's (may be None)."""

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer

    @abstractmethod
    def extract_tool_calls(self, model_output: str, request: Any = None) -> ExtractedToolCalls:
        """The tool calls in a whole output and the text that is left as content. Never raises on malformed
        output: text that is not a well-formed call stays content."""

    @abstractmethod
    def extract_tool_calls_streaming(self, previous_text: str, current_text: str, delta_text: str,
                                     previous_token_ids: Sequence[int] = (), current_token_ids: Sequence[int] = (),
                                     delta_token_ids: Sequence[int] = (), request: Any = None
                                     ) -> DeltaMessage | None:
        """The delta to send after `delta_text` arrived, or None. Over a whole stream the content pieces and the
        tool calls (name once, arguments concatenated) add up to what `extract_tool_calls` gives, whatever the
        chunk boundaries."""


class ReasoningParser(Component, ABC):
    """Splits a model's reasoning from its answer (selected with `--reasoning-parser NAME`); fills the message's
    `reasoning_content`."""

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer

    @abstractmethod
    def extract_reasoning(self, model_output: str, request: Any = None) -> tuple[str | None, str | None]:
        """(reasoning_content, content) of a whole output; None for a part that is absent."""

    @abstractmethod
    def extract_reasoning_streaming(self, previous_text: str, current_text: str, delta_text: str,
                                    previous_token_ids: Sequence[int] = (), current_token_ids: Sequence[int] = (),
                                    delta_token_ids: Sequence[int] = (), request: Any = None
                                    ) -> DeltaMessage | None:
        """The delta (reasoning_content and/or content) to send after `delta_text` arrived, or None. Over a whole
        stream the pieces add up to what `extract_reasoning` gives, whatever the chunk boundaries."""
