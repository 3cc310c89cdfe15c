"""Tool calling and reasoning (issue 29 item 2): the `hermes` and `llama3_json` tool parsers and the `qwen3` /
`deepseek_r1` reasoning parsers on hand-written outputs, whole and streamed at every chunk boundary; `tool_choice`
planning; and the server, through the real `openai` client: `none` gives text, `auto` without the flags is a 400,
a forced `<tool_call>` output comes back as tool_calls with its reasoning (streamed and not), and `required` /
named functions give calls whose arguments validate against the tool's schema (needs structured outputs)."""

from __future__ import annotations

import asyncio
import json
import random

import jsonschema
import openai
import pytest
import torch

from tests.serve_utils import ENGINE_KWARGS, ServerProcess
from weavelm.core.registry import Registry
from weavelm.errors import ConfigError, RequestError
from weavelm.tools.assemble import ChoiceStream, assemble, required_calls
from weavelm.tools.choice import ToolPlan, plan_tools, required_schema
from weavelm.tools.hermes import HermesToolParser
from weavelm.tools.llama3_json import Llama3JsonToolParser
from weavelm.tools.settings import ToolSettings, parser_registry
from weavelm.tools.think import DeepSeekR1ReasoningParser, ThinkReasoningParser

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}},
                                       "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

HERMES_OUT = ('I will check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
              '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET \\"x\\" {}"}}\n</tool_call>')
LLAMA_OUT = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}; '
             '{"name": "get_time", "parameters": {"zone": "UTC"}}')
THINK_OUT = "<think>The user wants weather; </thi> is not a tag.</think>\n\n" + HERMES_OUT


def chunked(text: str, sizes: list[int]) -> list[str]:
    pieces, pos, i = [], 0, 0
    while pos < len(text):
        pieces.append(text[pos:pos + sizes[i % len(sizes)]])
        pos += sizes[i % len(sizes)]
        i += 1
    return pieces


def boundaries():
    """Chunkings to stream with: one character at a time, fixed sizes, and seeded random sizes."""
    rng = random.Random(0)
    return [[1], [2], [3], [5], [7], [1, 4, 2]] + [[rng.randint(1, 9) for _ in range(20)] for _ in range(6)]


def collect(stream: ChoiceStream, pieces: list[str]) -> dict:
    """Concatenate a stream's deltas the way an OpenAI client does."""
    content, reasoning, calls = "", "", {}
    for i, piece in enumerate(pieces):
        delta = stream.feed(piece, final=i == len(pieces) - 1)
        if delta is None:
            continue
        content += delta.content or ""
        reasoning += delta.reasoning_content or ""
        for call in delta.tool_calls:
            if call.id is not None:
                assert call.index not in calls, "a call's id and name come once"
                calls[call.index] = {"id": call.id, "name": call.function.name, "arguments": ""}
            calls[call.index]["arguments"] += call.function.arguments or ""
    return {"content": content or None, "reasoning": reasoning or None,
            "calls": [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]}


def whole(message) -> dict:
    return {"content": message.content, "reasoning": message.reasoning_content,
            "calls": [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]}


# -- parsers on hand-written outputs --------------------------------------------------------------------------------
def test_hermes_extracts_calls_and_leading_content():
    found = HermesToolParser().extract_tool_calls(HERMES_OUT)
    assert found.tools_called and found.content == "I will check both.\n"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in found.tool_calls] == [
        ("get_weather", {"city": "Paris", "days": 3}), ("get_time", {"zone": 'CET "x" {}'})]
    assert len({c.id for c in found.tool_calls}) == 2 and all(c.type == "function" for c in found.tool_calls)
    plain = HermesToolParser().extract_tool_calls("no calls here")
    assert not plain.tools_called and plain.content == "no calls here"
    broken = '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'
    assert HermesToolParser().extract_tool_calls(broken).content == broken  # malformed: stays content
    unclosed = HermesToolParser().extract_tool_calls('<tool_call>{"name": "get_time", "arguments": {"zone": "a"}}')
    assert unclosed.tools_called and unclosed.content is None  # cut before </tool_call> but whole JSON


def test_llama3_json_extracts_calls_after_python_tag():
    parser = Llama3JsonToolParser()
    found = parser.extract_tool_calls(LLAMA_OUT)
    assert found.tools_called and found.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in found.tool_calls] == [
        ("get_weather", {"city": "Oslo", "days": 2}), ("get_time", {"zone": "UTC"})]
    no_tag = parser.extract_tool_calls('{"name": "get_time", "parameters": {"zone": "UTC"}}')
    assert no_tag.tools_called and no_tag.tool_calls[0].function.name == "get_time"
    for text in ("The answer is {42}.", '{"name": "get_time", "parameters": {"zone": "UTC"}} and more text'):
        plain = parser.extract_tool_calls(text)
        assert not plain.tools_called and plain.content == text


def test_reasoning_split():
    qwen3, r1 = ThinkReasoningParser(), DeepSeekR1ReasoningParser()
    assert qwen3.extract_reasoning("<think>a </think>b") == ("a ", "b")
    assert qwen3.extract_reasoning("\n<think>cut off") == ("cut off", None)
    assert qwen3.extract_reasoning("no thinking") == (None, "no thinking")
    assert r1.extract_reasoning("still thinking</think>done") == ("still thinking", "done")
    assert r1.extract_reasoning("<think>x</think>") == ("x", None)
    assert r1.extract_reasoning("all reasoning") == ("all reasoning", None)


@pytest.mark.parametrize("case", ["hermes", "llama3_json", "think+hermes", "r1", "plain+hermes", "partial-tag"])
def test_streaming_adds_up_to_the_whole_message_at_any_boundary(case):
    text, tool_cls, reasoning_cls = {
        "hermes": (HERMES_OUT, HermesToolParser, None),
        "llama3_json": (LLAMA_OUT, Llama3JsonToolParser, None),
        "think+hermes": (THINK_OUT, HermesToolParser, ThinkReasoningParser),
        "r1": ("thinking <b>bold</b></think>The answer <tool", HermesToolParser, DeepSeekR1ReasoningParser),
        "plain+hermes": ("Just text, <tool_c and <think> and no call.", HermesToolParser, ThinkReasoningParser),
        "partial-tag": ("ends with a partial tag <tool_ca", HermesToolParser, None),
    }[case]
    plan = ToolPlan("auto", TOOLS)
    want = whole(assemble(text, plan, tool_cls(), reasoning_cls() if reasoning_cls else None))
    if case in ("hermes", "llama3_json", "think+hermes"):
        assert len(want["calls"]) == 2
    if case in ("think+hermes", "r1"):
        assert want["reasoning"]
    for sizes in boundaries():
        got = collect(ChoiceStream(plan, tool_cls(), reasoning_cls() if reasoning_cls else None),
                      chunked(text, sizes))
        assert got == want, (sizes, got, want)


def test_required_and_named_outputs_become_calls_streamed_or_not():
    required = plan_tools(TOOLS, "required", None, auto_enabled=False)
    out = '[{"name": "get_time", "parameters": {"zone": "UTC"}}, {"name": "get_weather", "parameters": ' \
          '{"city": "Rome", "days": 1}}]'
    jsonschema.validate(json.loads(out), required.schema)
    want = whole(assemble(out, required))
    assert want["calls"] == [("get_time", {"zone": "UTC"}), ("get_weather", {"city": "Rome", "days": 1})]
    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, None, False)
    assert named.schema == SCHEMAS["get_weather"] and named.function == "get_weather"
    assert whole(assemble('{"city": "Oslo", "days": 4}', named))["calls"] == [("get_weather",
                                                                                {"city": "Oslo", "days": 4})]
    for sizes in boundaries():
        assert collect(ChoiceStream(required), chunked(out, sizes)) == want
        assert collect(ChoiceStream(named), chunked('{"city": "Oslo", "days": 4}', sizes))["calls"] == [
            ("get_weather", {"city": "Oslo", "days": 4})]
    assert required_calls('[{"name": "get_time", "parameters": {"zo') is None  # cut off: not a call
    assert assemble('[{"name": "get_time"', required).content == '[{"name": "get_time"'


def test_required_schema_is_vllms():
    schema = required_schema(TOOLS)
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    assert [o["properties"]["name"]["enum"] for o in schema["items"]["anyOf"]] == [["get_weather"], ["get_time"]]
    assert schema["items"]["anyOf"][0]["properties"]["parameters"] == SCHEMAS["get_weather"]
    assert required_schema(TOOLS, parallel=False)["maxItems"] == 1
    bad_call = [{"name": "get_weather", "parameters": {"zone": "UTC"}}]  # another tool's parameters
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad_call, schema)


def test_tool_choice_planning_errors():
    assert plan_tools(None, None, None, False).mode == "none"
    assert plan_tools(TOOLS, "none", None, False).tools == TOOLS
    with pytest.raises(RequestError, match="--enable-auto-tool-choice --tool-call-parser"):
        plan_tools(TOOLS, None, None, auto_enabled=False)  # tools default to "auto", as in vLLM
    assert plan_tools(TOOLS, None, None, auto_enabled=True).mode == "auto"
    with pytest.raises(RequestError, match="tool_choice: .*'nope' is not among the tools"):
        plan_tools(TOOLS, {"type": "function", "function": {"name": "nope"}}, None, True)
    with pytest.raises(RequestError, match="tool_choice: .*needs `tools`"):
        plan_tools(None, "required", None, True)
    with pytest.raises(RequestError, match=r"tools\[0\].function: must be an object"):
        plan_tools([{"type": "function", "function": {"description": "no name"}}], "required", None, True)
    with pytest.raises(RequestError, match="tool_choice: must be"):
        plan_tools(TOOLS, "sometimes", None, True)


def test_parsers_are_plugins_selected_by_flag():
    from weavelm.plugin import KIND_ABCS, ReasoningParser, ToolParser

    assert KIND_ABCS["tool_parser"] is ToolParser and KIND_ABCS["reasoning_parser"] is ReasoningParser
    registry = parser_registry(Registry.load())
    assert {"hermes", "llama3_json"} <= set(registry.names("tool_parser"))
    assert {"qwen3", "deepseek_r1"} <= set(registry.names("reasoning_parser"))
    settings = ToolSettings.from_flags(True, "hermes", "qwen3", registry)
    assert settings.auto and settings.tool_parser is HermesToolParser
    assert settings.reasoning_parser is ThinkReasoningParser
    with pytest.raises(ConfigError, match="--tool-call-parser: unknown tool_parser plugin 'hermez'.*hermes"):
        ToolSettings.from_flags(True, "hermez", None, registry)
    with pytest.raises(ConfigError, match="--reasoning-parser: unknown reasoning_parser plugin"):
        ToolSettings.from_flags(False, None, "qwen9", registry)
    with pytest.raises(ConfigError, match="--enable-auto-tool-choice: needs --tool-call-parser"):
        ToolSettings.from_flags(True, None, None, registry)


def test_serve_flags_are_vllms_and_checked_before_the_model_loads():
    import argparse

    from weavelm.errors import WeaveError
    from weavelm.serve.cli import _check_args, add_serve_parser, tool_settings

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(), add_engine_args=lambda p: None)
    args = parser.parse_args(["serve", "--enable-auto-tool-choice", "--tool-call-parser", "llama3_json",
                              "--reasoning-parser", "deepseek_r1"])
    settings = tool_settings(args)
    assert settings.auto and settings.tool_parser is Llama3JsonToolParser
    assert settings.reasoning_parser is DeepSeekR1ReasoningParser
    assert tool_settings(parser.parse_args(["serve"])) == ToolSettings()
    for argv, flag in ((["--enable-auto-tool-choice"], "--enable-auto-tool-choice"),
                       (["--tool-call-parser", "nope"], "--tool-call-parser"),
                       (["--reasoning-parser", "nope"], "--reasoning-parser")):
        with pytest.raises(WeaveError, match=flag):
            _check_args(parser.parse_args(["serve", *argv]))


# -- the server -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(smol_tokenizer_model):
    from weavelm.core.async_llm import AsyncLLM

    torch.set_num_threads(1)
    engine = AsyncLLM(model=smol_tokenizer_model, max_model_len=256, **ENGINE_KWARGS)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def structured_enforced(engine) -> bool:
    """Whether the engine holds outputs to `SamplingParams.structured_outputs` (a `choice` probe: random weights
    never produce one of the choices exactly by chance)."""
    from weavelm import SamplingParams
    from weavelm.core.request import StructuredOutputsParams

    async def probe(seed: int) -> str:
        params = SamplingParams(max_tokens=4, temperature=1.0, seed=seed,
                                structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
        outs = [out async for out in engine.generate("Answer:", params)]
        return outs[-1].outputs[0].text

    return all(asyncio.run(probe(seed)) in ("yes", "no") for seed in range(3))


@pytest.fixture(scope="module")
def server(smol_tokenizer_model):
    # a reasoning parser but no auto tool choice: "auto" is refused, the rest works
    srv = ServerProcess(smol_tokenizer_model, "--max-model-len", "512", "--served-model-name", "tiny",
                        "--reasoning-parser", "qwen3")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


MESSAGES = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]


def test_none_gives_text_and_auto_needs_the_flags(client):
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                         max_tokens=8, temperature=0)
    choice = out.choices[0]
    assert choice.message.content and not choice.message.tool_calls and choice.finish_reason == "length"
    for kwargs in ({"tool_choice": "auto"}, {}):  # no tool_choice with tools means auto, as in vLLM
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=4, **kwargs)
        assert "--enable-auto-tool-choice --tool-call-parser" in e.value.body["message"]
        assert e.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=4,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "'nope' is not among the tools" in e.value.body["message"]


def _stream_calls(stream) -> tuple[list[tuple[str, str]], str | None]:
    calls, finish = {}, None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, ["", ""])
                entry[0] += call.function.name or ""
                entry[1] += call.function.arguments or ""
    return [tuple(v) for _, v in sorted(calls.items())], finish


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_give_calls_that_validate(client, structured_enforced, stream):
    if not structured_enforced:
        pytest.skip("SamplingParams.structured_outputs is not enforced by this engine yet (structured outputs, "
                    "issue 29 item 1)")
    for tool_choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        for seed in range(2):
            kwargs = dict(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice, max_tokens=160,
                          temperature=1.0, seed=seed)
            if stream:
                calls, finish = _stream_calls(client.chat.completions.create(stream=True, **kwargs))
            else:
                choice = client.chat.completions.create(**kwargs).choices[0]
                calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
                finish = choice.finish_reason
            assert calls, (tool_choice, seed)
            assert finish == ("tool_calls" if tool_choice == "required" else "stop")
            for name, arguments in calls:
                assert name in SCHEMAS if tool_choice == "required" else name == "get_time"
                jsonschema.validate(json.loads(arguments), SCHEMAS[name])


FORCED = ('<think>Paris weather, 3 days.</think>\n\nChecking.<tool_call>\n{"name": "get_weather", "arguments": '
          '{"city": "Paris", "days": 3}}\n</tool_call>')


@pytest.fixture
def forced_app_client(engine):
    """The app in this process with `--enable-auto-tool-choice --tool-call-parser hermes --reasoning-parser qwen3`,
    its model forced (logits hook) to write FORCED then end, and an openai client on it."""
    from fastapi.testclient import TestClient

    from weavelm.serve.app import build_app

    tokenizer = engine.tokenizer
    target = tokenizer.encode(FORCED, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert tokenizer.decode(target, skip_special_tokens=True) == FORCED
    steps: dict[str, int] = {}

    def force(req_ids, logits):
        forced = torch.full_like(logits, float("-inf"))
        for i, rid in enumerate(req_ids):
            k = steps[rid] = steps.get(rid, -1) + 1
            forced[i, target[min(k, len(target) - 1)]] = 0.0
        return forced

    asyncio.run(engine.collective_rpc("set_logits_hook", (force,)))
    app = build_app(engine, "tiny", tools=ToolSettings.from_flags(True, "hermes", "qwen3"))
    try:
        with TestClient(app) as http:
            yield openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)
    finally:
        asyncio.run(engine.collective_rpc("set_logits_hook", (None,)))
        app.state.serve.prompts.close()


def test_auto_hermes_output_becomes_tool_calls_with_reasoning(forced_app_client):
    kwargs = dict(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=100)
    choice = forced_app_client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == "Paris weather, 3 days."
    assert choice.message.content == "\n\nChecking."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 3}

    content = reasoning = ""
    calls, finish = [], None
    for chunk in forced_app_client.chat.completions.create(stream=True, **kwargs):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        reasoning += getattr(delta, "reasoning_content", None) or ""
        calls.append(delta.tool_calls or [])
        finish = chunk.choices[0].finish_reason or finish
    flat = [c for piece in calls for c in piece]
    assert (content, reasoning, finish) == ("\n\nChecking.", "Paris weather, 3 days.", "tool_calls")
    assert flat[0].id and flat[0].function.name == "get_weather" and all(c.index == 0 for c in flat)
    assert json.loads("".join(c.function.arguments or "" for c in flat)) == {"city": "Paris", "days": 3}
    assert sum(1 for piece in calls if piece) > 2  # the arguments came in several chunks

    plain = forced_app_client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS,
                                                      tool_choice="none", max_tokens=100).choices[0]
    assert plain.message.tool_calls == [] and plain.finish_reason == "stop"  # "none": no parsing for calls
    assert plain.message.content.startswith("\n\nChecking.<tool_call>")


def test_template_gets_tools_and_earlier_calls(smol_tokenizer_model):
    """`tools` reach the chat template, and an earlier assistant call's JSON arguments reach it as a mapping (as
    vLLM passes them), next to the tool message's `tool_call_id`."""
    from transformers import AutoTokenizer

    from weavelm.chat_template import render_chat
    from weavelm.serve.chat import conversation
    from weavelm.serve.protocol import ChatMessage

    template = ("{% for t in tools %}[tool {{ t.function.name }}]{% endfor %}{% for m in messages %}<{{ m.role }}>"
                "{% for c in m.tool_calls or [] %}{{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}"
                "{{ m.tool_call_id or '' }}:{{ m.content }}{% endfor %}")
    messages = [ChatMessage(role="user", content="weather?"),
                ChatMessage(role="assistant", content=None, tool_calls=[{
                    "id": "call1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]),
                ChatMessage(role="tool", content="sunny", tool_call_id="call1")]
    tokenizer = AutoTokenizer.from_pretrained(smol_tokenizer_model)
    text = render_chat(tokenizer, conversation(messages), add_generation_prompt=False, chat_template=template,
                       tools=TOOLS)["prompt"]
    assert text == "[tool get_weather][tool get_time]<user>:weather?<assistant>get_weather(Paris):<tool>call1:sunny"
