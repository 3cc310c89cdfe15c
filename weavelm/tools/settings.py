"""The server's tool-calling and reasoning settings (`--enable-auto-tool-choice`, `--tool-call-parser`,
`--reasoning-parser`), checked against the installed parser plugins before the model loads."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from weavelm.core.registry import Registry
from weavelm.errors import ConfigError, PluginError

# the built-in parser plugins; registered directly too, so they resolve even where the installed distribution's
# entry points predate them (an editable install not reinstalled)
BUILTIN_MODULES = ("weavelm.tools.hermes", "weavelm.tools.llama3_json", "weavelm.tools.think")


def parser_registry(registry: Registry | None = None) -> Registry:
    registry = registry or Registry.load()
    for path in BUILTIN_MODULES:
        if not registry.pm.is_registered(importlib.import_module(path)):
            registry.register_module(path)
    return registry


@dataclass
class ToolSettings:
    """`tool_parser` / `reasoning_parser`: the parser classes (None: not set). `auto`: `tool_choice="auto"` is
    allowed (needs a tool parser)."""

    auto: bool = False
    tool_parser: type | None = None
    reasoning_parser: type | None = None

    @classmethod
    def from_flags(cls, enable_auto_tool_choice: bool = False, tool_call_parser: str | None = None,
                   reasoning_parser: str | None = None, registry: Registry | None = None) -> ToolSettings:
        """Settings from vLLM's flags; a ConfigError naming the flag when a parser is unknown or
        --enable-auto-tool-choice has no --tool-call-parser."""
        if enable_auto_tool_choice and not tool_call_parser:
            raise ConfigError("--enable-auto-tool-choice: needs --tool-call-parser NAME (e.g. hermes for Qwen, "
                              "llama3_json for Llama 3)")
        if not (tool_call_parser or reasoning_parser):
            return cls()
        registry = parser_registry(registry)
        return cls(enable_auto_tool_choice, _get(registry, "tool_parser", "--tool-call-parser", tool_call_parser),
                   _get(registry, "reasoning_parser", "--reasoning-parser", reasoning_parser))

    def new_tool_parser(self, tokenizer: Any) -> Any:
        return self.tool_parser(tokenizer) if self.tool_parser is not None else None

    def new_reasoning_parser(self, tokenizer: Any) -> Any:
        return self.reasoning_parser(tokenizer) if self.reasoning_parser is not None else None


def _get(registry: Registry, kind: str, flag: str, name: str | None) -> type | None:
    if not name:
        return None
    try:
        return registry.get(kind, name)
    except PluginError as e:
        raise ConfigError(f"{flag}: {e}") from None
