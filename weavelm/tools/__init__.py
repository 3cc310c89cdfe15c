"""Tool calling and reasoning for the chat server: the `tool_parser` and `reasoning_parser` plugin kinds and their
built-ins (`hermes`, `llama3_json`; `qwen3`, `deepseek_r1`), `tool_choice` planning, and message assembly."""

from weavelm.tools.interfaces import (DeltaFunctionCall, DeltaMessage, DeltaToolCall, ExtractedToolCalls,
                                      FunctionCall, ReasoningParser, ToolCall, ToolParser)

__all__ = ["DeltaFunctionCall", "DeltaMessage", "DeltaToolCall", "ExtractedToolCalls", "FunctionCall",
           "ReasoningParser", "ToolCall", "ToolParser"]
