"""`llama3_json` tool parser (Llama 3.1/3.2/3.3 JSON tool calling): the output is one or more
`{"name": ..., "parameters": {...}}` objects separated by `;`, possibly after `<|python_tag|>`. An output that
does not start with one is plain content."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from weavelm.core.hookspecs import hookimpl
from weavelm.tools.calls import CallStreamer, call_from_object, split_objects
from weavelm.tools.interfaces import DeltaMessage, ExtractedToolCalls, ToolParser

PYTHON_TAG = "<|python_tag|>"


def _body(text: str) -> str | None:
    """The calls' text after the optional python tag; None while the start is still undecided."""
    stripped = text.lstrip()
    if stripped.startswith(PYTHON_TAG):
        return stripped[len(PYTHON_TAG):].lstrip() or None
    if not stripped or PYTHON_TAG.startswith(stripped):
        return None
    return stripped


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    description = "{\"name\", \"parameters\"} JSON objects, optionally after <|python_tag|> (Llama 3.x)"

    def __init__(self, tokenizer: Any = None):
        super().__init__(tokenizer)
        self.content_sent = 0
        self.streamer = CallStreamer()

    def extract_tool_calls(self, model_output: str, request: Any = None) -> ExtractedToolCalls:
        body = _body(model_output)
        if body is None or not body.startswith("{"):
            return ExtractedToolCalls(False, [], model_output)
        objects, stop = split_objects(body, ";")
        calls = [call_from_object(json.loads(text)) if whole else None for text, whole in objects]
        if not calls or stop < len(body) or any(c is None for c in calls):
            return ExtractedToolCalls(False, [], model_output)
        return ExtractedToolCalls(True, calls, None)

    def extract_tool_calls_streaming(self, previous_text: str, current_text: str, delta_text: str,
                                     previous_token_ids: Sequence[int] = (), current_token_ids: Sequence[int] = (),
                                     delta_token_ids: Sequence[int] = (), request: Any = None
                                     ) -> DeltaMessage | None:
        body = _body(current_text)
        if body is None:
            return None
        if not body.startswith("{") or self.content_sent:  # plain content: all of it, as it comes
            piece = current_text[self.content_sent:]
            self.content_sent = len(current_text)
            return DeltaMessage(content=piece) if piece else None
        objects, _ = split_objects(body, ";")
        deltas = self.streamer.update(objects)
        return DeltaMessage(tool_calls=deltas) if deltas else None


@hookimpl
def weavelm_register(registry):
    registry.add("tool_parser", Llama3JsonToolParser.name, Llama3JsonToolParser)
