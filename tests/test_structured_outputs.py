"""Structured outputs (xgrammar): with random weights, every constrained output is in the constraint's language.
Offline (`LLM.generate`: plain, async scheduling, n-gram speculation) and through a real `weavelm serve` process
with the `openai` client (response_format, extra_body structured_outputs, guided_* aliases, streaming)."""

from __future__ import annotations

import json
import re

import openai
import pytest
import torch

from tests.serve_utils import ENGINE_KWARGS, ServerProcess
from weavelm import LLM, SamplingParams, StructuredOutputsParams

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["color", "ok", "tags"],
          "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}}}
REGEX = r"[a-z]{3,6}@example\.(com|org)"
CHOICES = ["yes", "no", "maybe later"]
PROMPTS = ['{"color": "red", "ok": true, "tags": ["a"]} {"color": "red", "ok": true, "tags": ["a"]}',
           "Once upon a time", "The answer is"]


def check_json(text: str) -> None:
    value = json.loads(text)
    try:
        import jsonschema
    except ImportError:  # by hand: the schema's keys and types
        assert set(value) == {"color", "ok", "tags"} and value["color"] in ("red", "green", "blue")
        assert isinstance(value["ok"], bool) and len(value["tags"]) <= 2
        assert all(t in ("a", "b") for t in value["tags"])
    else:
        jsonschema.validate(value, SCHEMA)


def constrained(seed: int) -> list[SamplingParams]:
    """JSON schema (without optional whitespace: random weights would pick whitespace forever), regex, choice and
    json_object, sampled at temperature 1 so the model's own choice is almost never in the language."""
    S = StructuredOutputsParams
    return [SamplingParams(max_tokens=64, temperature=1.0, seed=seed + i, structured_outputs=so)
            for i, so in enumerate([S(json=SCHEMA, disable_any_whitespace=True), S(regex=REGEX), S(choice=CHOICES),
                                    S(json_object=True, disable_any_whitespace=True)])]


def check_outputs(llm: LLM, rounds: int = 2) -> None:
    for r in range(rounds):
        params = constrained(100 * r)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
        outs = [o.outputs[0] for o in llm.generate(prompts, params)]
        for out in outs[:2] + outs[2:]:
            assert out.finish_reason in ("stop", "length")
        json_out, regex_out, choice_out, object_out = outs
        assert json_out.finish_reason == "stop", json_out.text
        check_json(json_out.text)
        assert regex_out.finish_reason == "stop" and re.fullmatch(REGEX, regex_out.text), regex_out.text
        assert choice_out.finish_reason == "stop" and choice_out.text in CHOICES, choice_out.text
        if object_out.finish_reason == "stop":  # an object can nest deeper than 64 tokens
            assert isinstance(json.loads(object_out.text), dict), object_out.text
        else:
            assert object_out.text.startswith("{")


@pytest.fixture(scope="module")
def llm(smol_tokenizer_model):
    torch.set_num_threads(1)
    engine = LLM(model=smol_tokenizer_model, **ENGINE_KWARGS)
    yield engine
    engine.shutdown()


def test_constrained_outputs_are_in_the_language(llm):
    check_outputs(llm)
    # the same prompts unconstrained produce none of that: the constraint did the work
    free = llm.generate(PROMPTS[1:2], SamplingParams(max_tokens=16, temperature=1.0, seed=0))[0].outputs[0].text
    assert not re.fullmatch(REGEX, free) and free not in CHOICES


def test_max_tokens_inside_the_grammar_finishes_with_length(llm):
    so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    out = llm.generate(["Hi"], SamplingParams(max_tokens=3, temperature=0, structured_outputs=so))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    assert out.text.startswith('{"')


def test_a_constraint_that_cannot_compile_fails_its_request(llm):
    for bad, kind in [(StructuredOutputsParams(regex="[a-z"), "regex"),
                      (StructuredOutputsParams(grammar="root ::= undefined_rule"), "grammar"),
                      (StructuredOutputsParams(json={"type": "no-such-type"}), "json")]:
        out = llm.generate(["Hi"], SamplingParams(max_tokens=4, structured_outputs=bad))[0]
        assert out.outputs[0].finish_reason == "error" and not out.outputs[0].token_ids
        assert re.match(f"structured_outputs.{kind}: cannot compile .*: [A-Z]", out.error), out.error
    assert llm.generate(["Hi"], SamplingParams(max_tokens=2))[0].outputs[0].finish_reason == "length"


def test_with_async_scheduling(smol_tokenizer_model):
    torch.set_num_threads(1)
    engine = LLM(model=smol_tokenizer_model, async_scheduling=True, **ENGINE_KWARGS)
    try:
        check_outputs(engine)
    finally:
        engine.shutdown()


def test_with_ngram_speculation_drafts_are_checked(smol_tokenizer_model):
    torch.set_num_threads(1)
    engine = LLM(model=smol_tokenizer_model, speculative={"name": "ngram", "num_speculative_tokens": 3,
                                                          "prompt_lookup_min": 1, "prompt_lookup_max": 3},
                 **ENGINE_KWARGS)
    try:
        check_outputs(engine)
        # greedy JSON after a prompt full of the same JSON: the n-gram drafts come from the prompt
        so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
        outs = engine.generate([PROMPTS[0]] * 2, SamplingParams(max_tokens=64, temperature=0, structured_outputs=so))
        for o in outs:
            check_json(o.outputs[0].text)
        assert engine.get_stats().spec_num_draft_tokens > 0
    finally:
        engine.shutdown()


# -- the server ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(smol_tokenizer_model):
    srv = ServerProcess(smol_tokenizer_model, "--served-model-name", "x")
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    srv.stop()


def _chat(client, stream: bool = False, **kw):
    messages = [{"role": "user", "content": "Say something"}]
    if not stream:
        r = client.chat.completions.create(model="x", messages=messages, max_tokens=64, temperature=1.0, seed=3, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason
    text, finish = "", None
    for chunk in client.chat.completions.create(model="x", messages=messages, max_tokens=64, temperature=1.0,
                                                seed=3, stream=True, **kw):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_server_chat_response_format_and_structured_outputs(client, stream):
    text, finish = _chat(client, stream, response_format={
        "type": "json_schema", "json_schema": {"name": "color", "schema": {"enum": ["red", "green"]}, "strict": True}})
    assert finish == "stop" and json.loads(text) in ("red", "green"), text
    text, finish = _chat(client, stream, extra_body={"structured_outputs": {"choice": CHOICES}})
    assert finish == "stop" and text in CHOICES, text
    text, finish = _chat(client, stream, extra_body={"structured_outputs": {"json": SCHEMA,
                                                                            "disable_any_whitespace": True}})
    assert finish == "stop", text
    check_json(text)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_server_completions_structured_outputs_and_guided_aliases(client, stream):
    def complete(**kw):
        if not stream:
            c = client.completions.create(model="x", prompt="Hello", max_tokens=48, temperature=1.0, seed=5, **kw)
            return c.choices[0].text, c.choices[0].finish_reason
        text, finish = "", None
        for chunk in client.completions.create(model="x", prompt="Hello", max_tokens=48, temperature=1.0, seed=5,
                                               stream=True, **kw):
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    text, finish = complete(extra_body={"structured_outputs": {"regex": REGEX}})
    assert finish == "stop" and re.fullmatch(REGEX, text), text
    text, finish = complete(extra_body={"guided_regex": REGEX})
    assert finish == "stop" and re.fullmatch(REGEX, text), text
    text, finish = complete(extra_body={"guided_choice": CHOICES})
    assert finish == "stop" and text in CHOICES, text
    text, finish = complete(extra_body={"guided_json": SCHEMA, "guided_grammar": None})
    assert text.startswith("{") and finish in ("stop", "length")
    text, finish = complete(extra_body={"response_format": {  # the openai client's completions take no such arg
        "type": "json_schema", "json_schema": {"name": "c", "schema": {"enum": ["red", "green"]}}}})
    assert finish == "stop" and json.loads(text) in ("red", "green"), text


def test_server_json_object_and_length(client):
    r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       temperature=0, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")


def test_server_bad_grammar_is_a_400_naming_it(client):
    for body, kind in [({"structured_outputs": {"regex": "[a-z"}}, "regex"), ({"guided_grammar": "root ::= x"}, "grammar"),
                       ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                                    "schema": {"type": "nope"}}}},
                        "json")]:
        with pytest.raises(openai.BadRequestError, match=f"structured_outputs\\.{kind}: cannot compile"):
            client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                           extra_body=body)
    with pytest.raises(openai.BadRequestError, match="give only one output constraint"):
        client.completions.create(model="x", prompt="hi", max_tokens=4,
                                  extra_body={"guided_regex": "a", "guided_choice": ["a"]})


# -- the pieces -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiler(smol_tokenizer_model):
    from transformers import AutoTokenizer

    from weavelm.structured import GrammarCompiler

    return GrammarCompiler(AutoTokenizer.from_pretrained(smol_tokenizer_model), 49152 + 64)  # a padded vocab


def test_the_sampler_mask_matches_xgrammar(compiler):
    import xgrammar as xgr

    from weavelm.sample.sampler import AllowedTokens, apply_allowed_tokens

    grammar = compiler.matcher(StructuredOutputsParams(regex=REGEX))
    bitmask = torch.full((2, (compiler.vocab_size + 31) // 32), -1, dtype=torch.int32)
    grammar.fill(bitmask, 1)
    logits = torch.randn(3, compiler.vocab_size)
    ours, theirs = logits.clone(), logits[1:].clone()
    apply_allowed_tokens(ours, AllowedTokens(torch.tensor([1, 2]), bitmask))
    xgr.apply_token_bitmask_inplace(theirs, bitmask)
    assert torch.equal(ours[0], logits[0])  # an unlisted row is untouched
    assert torch.equal(ours[1:], theirs)
    allowed = torch.isfinite(ours[2]).nonzero().flatten().tolist()
    assert 0 < len(allowed) < 49152 // 4 and max(allowed) < 49152  # lowercase words only; no padding id


def test_drafts_are_cut_at_the_first_token_the_grammar_rejects(compiler, smol_tokenizer_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_model)
    grammar = compiler.matcher(StructuredOutputsParams(choice=["maybe later"]))
    good = tok.encode("maybe later", add_special_tokens=False)
    junk = tok.encode("!!", add_special_tokens=False)
    assert grammar.valid_prefix(good + junk + good) == len(good)
    assert grammar.valid_prefix(junk + good) == 0
    grammar.advance(good[:1])  # the state is kept between checks: only the accepted token moved it
    assert grammar.valid_prefix(good[1:] + [tok.eos_token_id]) == len(good)
    assert not grammar.is_terminated


def test_the_constraint_crosses_the_engine_process_boundary():
    from weavelm.core import serial
    from weavelm.core.request import Request

    for so in (StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True), StructuredOutputsParams(choice=CHOICES)):
        request = Request("r", [1, 2, 3], SamplingParams(structured_outputs=so), eos_token_id=2)
        for ser in (serial.MsgpackSerializer(),):
            _, rows = ser.decode(ser.encode(serial.ADD, [serial.request_to_wire(request)]))
            assert serial.request_from_wire(rows[0]).sampling_params.structured_outputs == so
