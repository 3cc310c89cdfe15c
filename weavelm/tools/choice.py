"""A chat request's `tools` and `tool_choice`, checked and planned (vLLM's rules): `none` (tools go to the chat
template only), `auto` (the tool parser finds calls; needs `--enable-auto-tool-choice --tool-call-parser NAME`),
`required` and a named function (guaranteed by structured outputs: the output is held to a JSON schema, vLLM's)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from weavelm.errors import RequestError

AUTO_FLAGS = "--enable-auto-tool-choice --tool-call-parser NAME"


@dataclass
class ToolPlan:
    """`mode`: "none", "auto", "required" or "named" (`function` then names it). `tools`: the request's tools for
    the chat template (None: no tools). `schema`: the JSON schema the output is held to (required, named)."""

    mode: str = "none"
    tools: list[dict[str, Any]] | None = None
    function: str | None = None
    schema: dict[str, Any] | None = None


def plan_tools(tools: list[Any] | None, tool_choice: Any, parallel_tool_calls: bool | None,
               auto_enabled: bool) -> ToolPlan:
    """The plan of one request; a RequestError naming `tools` or `tool_choice` when they are malformed or ask for
    `auto` on a server started without the flags."""
    checked = [_check_tool(i, t) for i, t in enumerate(tools or [])]
    if tool_choice is None:
        tool_choice = "auto" if checked else "none"
    if tool_choice == "none":
        return ToolPlan("none", checked or None)
    if not checked:
        raise RequestError(f"tool_choice: {json.dumps(tool_choice)} needs `tools`; declare the functions to call")
    if tool_choice == "auto":
        if not auto_enabled:
            raise RequestError(f'tool_choice: "auto" needs the server started with {AUTO_FLAGS} (e.g. '
                               f'--tool-call-parser hermes); or send tool_choice "required", "none" or a named '
                               f'function')
        return ToolPlan("auto", checked)
    if tool_choice == "required":
        return ToolPlan("required", checked, schema=required_schema(checked, parallel_tool_calls is not False))
    name = _named(tool_choice)
    by_name = {t["function"]["name"]: t["function"] for t in checked}
    if name not in by_name:
        raise RequestError(f"tool_choice: function {name!r} is not among the tools ({', '.join(by_name)})")
    return ToolPlan("named", checked, function=name, schema=_parameters(by_name[name]))


def required_schema(tools: list[dict[str, Any]], parallel: bool = True) -> dict[str, Any]:
    """vLLM's schema for `tool_choice="required"`: a non-empty array of {"name": one tool's name, "parameters":
    that tool's parameter schema} (one item at most when `parallel` is False)."""
    options = [{"properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                               "parameters": _parameters(t["function"])},
                "required": ["name", "parameters"]} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": options}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object", "properties": {}}


def _check_tool(index: int, tool: Any) -> dict[str, Any]:
    where = f"tools[{index}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise RequestError(f'{where}: must be {{"type": "function", "function": {{"name": ..., "parameters": '
                           f'{{...}}}}}} (got {str(tool)[:200]})')
    function = tool.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise RequestError(f"{where}.function: must be an object with a non-empty string `name`")
    params = function.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise RequestError(f"{where}.function.parameters: must be a JSON schema object (got {str(params)[:200]})")
    return {"type": "function", "function": function}


def _named(tool_choice: Any) -> str:
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if tool_choice in ("auto", "required", "none") or not isinstance(function, dict) \
            or tool_choice.get("type", "function") != "function" or not isinstance(function.get("name"), str):
        raise RequestError(f'tool_choice: must be "none", "auto", "required" or {{"type": "function", '
                           f'"function": {{"name": ...}}}} (got {json.dumps(tool_choice)[:200]})')
    return function["name"]
