"""`hermes` tool parser (Qwen2.5, Qwen3, Hermes): each call is `<tool_call>{"name": ..., "arguments": {...}}
</tool_call>`; the text before the first call is the content."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from weavelm.core.hookspecs import hookimpl
from weavelm.tools.calls import CallStreamer, parse_call, partial_tag_length
from weavelm.tools.interfaces import DeltaMessage, ExtractedToolCalls, ToolParser

START, END = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)$", re.DOTALL)


class HermesToolParser(ToolParser):
    name = "hermes"
    description = "<tool_call>{JSON}</tool_call> blocks (Qwen2.5, Qwen3, Hermes models)"

    def __init__(self, tokenizer: Any = None):
        super().__init__(tokenizer)
        self.content_sent = 0
        self.streamer = CallStreamer()

    def extract_tool_calls(self, model_output: str, request: Any = None) -> ExtractedToolCalls:
        start = model_output.find(START)
        if start < 0:
            return ExtractedToolCalls(False, [], model_output)
        calls = [parse_call((closed or open_).strip()) for closed, open_ in _BLOCK.findall(model_output)]
        if not calls or any(c is None for c in calls):
            return ExtractedToolCalls(False, [], model_output)
        return ExtractedToolCalls(True, calls, model_output[:start] or None)

    def extract_tool_calls_streaming(self, previous_text: str, current_text: str, delta_text: str,
                                     previous_token_ids: Sequence[int] = (), current_token_ids: Sequence[int] = (),
                                     delta_token_ids: Sequence[int] = (), request: Any = None
                                     ) -> DeltaMessage | None:
        start = current_text.find(START)
        content_end = start if start >= 0 else len(current_text) - partial_tag_length(current_text, START)
        delta = DeltaMessage()
        if content_end > self.content_sent:
            delta.content = current_text[self.content_sent:content_end]
            self.content_sent = content_end
        if start >= 0:
            objects = []
            for block in current_text[start:].split(START)[1:]:
                inner, closed, _ = block.partition(END)
                inner = inner.lstrip()
                objects.append((inner if inner.startswith("{") else "", bool(closed)))
            delta.tool_calls = self.streamer.update(objects)
        return None if delta.is_empty() else delta


@hookimpl
def weavelm_register(registry):
    registry.add("tool_parser", HermesToolParser.name, HermesToolParser)
