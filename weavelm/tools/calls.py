"""JSON tool calls in model text, whole or streamed: one `{"name": ..., "arguments": {...}}` object per call (the
arguments key may be `parameters`). Shared by the hermes and llama3_json parsers and by `tool_choice="required"`.

Streaming never re-serializes a partial object (its closing brackets would change as it grows): the name is sent
once it is a complete string (read with `partial-json-parser`), and the arguments are sent as the model's own text
of the value, which is final as it arrives: while the value is incomplete, every character so far belongs to it;
once `json.JSONDecoder.raw_decode` finds its end, the rest is sent and the call is done."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import partial_json_parser
from partial_json_parser.core.options import Allow

from weavelm.tools.interfaces import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall, tool_call_id

ARGUMENT_KEYS = ("arguments", "parameters")
_DECODER = json.JSONDecoder()
_WS = " \t\r\n"


def parse_call(text: str, argument_keys: tuple[str, ...] = ARGUMENT_KEYS) -> ToolCall | None:
    """The call in one whole JSON object text, or None when it is not `{"name": str, <argument key>: ...}`."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return call_from_object(obj, argument_keys)


def call_from_object(obj: object, argument_keys: tuple[str, ...] = ARGUMENT_KEYS) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = next((obj[k] for k in argument_keys if k in obj), {})
    arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return ToolCall(FunctionCall(obj["name"], arguments))


def split_objects(body: str, separators: str) -> tuple[list[tuple[str, bool]], int]:
    """The JSON objects at the start of `body`, separated by whitespace and `separators`: (text, complete) each,
    the last possibly incomplete; and where parsing stopped (len(body) when everything was consumed)."""
    objects: list[tuple[str, bool]] = []
    pos = 0
    while True:
        while pos < len(body) and (body[pos] in _WS or (objects and body[pos] in separators)):
            pos += 1
        if pos >= len(body) or body[pos] != "{":
            return objects, pos
        try:
            _, end = _DECODER.raw_decode(body, pos)
        except ValueError:
            objects.append((body[pos:], False))
            return objects, len(body)
        objects.append((body[pos:end], True))
        pos = end


def partial_name(text: str) -> str | None:
    """The call's name once it is a complete string in the (possibly partial) object `text`."""
    try:
        obj = partial_json_parser.loads(text, Allow.ALL & ~Allow.STR)
    except Exception:  # malformed so far: no name yet
        return None
    name = obj.get("name") if isinstance(obj, dict) else None
    return name if isinstance(name, str) and name else None


def arguments_so_far(text: str, argument_keys: tuple[str, ...]) -> tuple[str | None, bool]:
    """(the arguments' JSON text that is final so far, whether it is whole) of the partial object `text`."""
    keys = "|".join(re.escape(k) for k in argument_keys)
    m = re.search(rf'"(?:{keys})"\s*:\s*', text)
    if m is None:
        return None, False
    value = text[m.end():]
    if not value:
        return "", False
    try:
        parsed, end = _DECODER.raw_decode(value)
    except ValueError:
        # incomplete: all of it belongs to the value (a string value is sent only once whole)
        return (None if value[0] == '"' else value), False
    return (parsed if isinstance(parsed, str) else value[:end]), True


@dataclass
class _CallState:
    id: str = field(default_factory=tool_call_id)
    name_sent: bool = False
    arguments_sent: str = ""
    done: bool = False


class CallStreamer:
    """Turns the growing texts of a stream's call objects into `DeltaToolCall`s, each call's name once and its
    arguments piece by piece; `sent` tells whether any call has started."""

    def __init__(self, argument_keys: tuple[str, ...] = ARGUMENT_KEYS):
        self.argument_keys = argument_keys
        self.calls: list[_CallState] = []

    @property
    def sent(self) -> bool:
        return any(c.name_sent for c in self.calls)

    def update(self, objects: list[tuple[str, bool]]) -> list[DeltaToolCall]:
        deltas: list[DeltaToolCall] = []
        for index, (text, _complete) in enumerate(objects):
            if index == len(self.calls):
                self.calls.append(_CallState())
            state = self.calls[index]
            if not state.name_sent:
                name = partial_name(text)
                if name is None:
                    break  # calls go out in order
                state.name_sent = True
                deltas.append(DeltaToolCall(index, state.id, "function", DeltaFunctionCall(name=name, arguments="")))
            if state.done:
                continue
            arguments, whole = arguments_so_far(text, self.argument_keys)
            if arguments is not None and len(arguments) > len(state.arguments_sent) \
                    and arguments.startswith(state.arguments_sent):
                deltas.append(DeltaToolCall(index, function=DeltaFunctionCall(
                    arguments=arguments[len(state.arguments_sent):])))
                state.arguments_sent = arguments
            state.done = whole
        return deltas


def partial_tag_length(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag` (held back while streaming)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
