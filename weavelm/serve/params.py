"""From an API request to the engine's `SamplingParams`: a mapping of names, never a second validation. Range and
type rules live in `SamplingParams`; a field it does not take yet is answered with a 400 naming the field."""

from __future__ import annotations

import dataclasses
from typing import Any

from weavelm.core.request import SamplingParams, StructuredOutputsParams
from weavelm.errors import RequestError
from weavelm.serve.errors import APIError
from weavelm.serve.prompts import check_stop
from weavelm.serve.protocol import ChatCompletionRequest, CompletionRequest

MAX_N = 128  # completions per request: bounds the fan-out of one HTTP request
DIRECT = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos",
          "include_stop_str_in_output", "priority")
# Passed through when this engine's SamplingParams has the field; a 400 otherwise unless the value is neutral.
OPTIONAL = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "min_tokens": 0,
            "logit_bias": {}}
# The engine's defaults that the model's generation_config.json may change (vLLM's default_sampling_params).
MODEL_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def supported_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(SamplingParams)}


def model_defaults(llm: Any) -> dict[str, Any]:
    """Sampling defaults from the model (`LLM.get_default_sampling_params()`, when the engine has it) that differ
    from SamplingParams' own; a request's explicit values win over them."""
    getter = getattr(llm, "get_default_sampling_params", None)
    if getter is None:
        return {}
    defaults, base = getter(), SamplingParams()
    return {name: getattr(defaults, name) for name in MODEL_DEFAULTS
            if hasattr(defaults, name) and getattr(defaults, name) != getattr(base, name, None)}


def check_unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    """OpenAI fields this server accepts but cannot honour give a 400 unless left at their neutral value."""
    if not 1 <= req.n <= MAX_N:
        raise APIError(400, f"n: must be an integer in [1, {MAX_N}] (got {req.n})", param="n")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise APIError(400, "suffix: is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of: is not supported (only best_of = n)", param="best_of")


def build_params(req: CompletionRequest | ChatCompletionRequest, max_tokens: int, logprobs: int | None,
                 defaults: dict[str, Any]) -> SamplingParams:
    """SamplingParams for one completion; raises RequestError (the engine's message) on a bad value."""
    check_stop(req.stop)
    kwargs: dict[str, Any] = dict(defaults)
    kwargs.update({name: getattr(req, name) for name in DIRECT if getattr(req, name) is not None})
    kwargs["max_tokens"] = max_tokens
    if logprobs is not None:
        # the engine returns the sampled token's logprob for any N >= 1 and the top N where it supports them;
        # the response is trimmed to N
        kwargs["logprobs"] = logprobs if isinstance(logprobs, bool) or logprobs < 0 else max(logprobs, 1)
    fields = supported_fields()
    for name, neutral in OPTIONAL.items():
        value = getattr(req, name)
        if value is None:
            continue
        if name == "logit_bias":
            value = _logit_bias(value)
        if name in fields:
            kwargs[name] = value
        elif value != neutral:
            raise APIError(400, f"{name}: is not supported by this engine", param=name)
    structured = structured_outputs(req)
    if structured is not None:
        kwargs["structured_outputs"] = structured
    return SamplingParams(**kwargs)


def _logit_bias(value: dict[str, float]) -> dict[int, float]:
    out = {}
    for key, bias in value.items():
        try:
            out[int(key)] = bias
        except ValueError:
            raise RequestError(f"logit_bias: keys must be token ids (got {key!r})") from None
    return out


GUIDED_ALIASES = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}


def structured_outputs(req: CompletionRequest | ChatCompletionRequest) -> StructuredOutputsParams | None:
    """The request's output constraint, from exactly one of OpenAI's `response_format`, vLLM's
    `structured_outputs` or vLLM's older `guided_*` fields; None when unconstrained."""
    given: list[tuple[str, dict[str, Any]]] = []
    fmt = req.response_format
    if fmt is not None:
        spec = _response_format(fmt)
        if spec is not None:
            given.append(("response_format", spec))
    if req.structured_outputs is not None:
        given.append(("structured_outputs", dict(req.structured_outputs)))
    for alias, kind in GUIDED_ALIASES.items():
        value = getattr(req, alias)
        if value is not None:
            given.append((alias, {kind: value}))
    if not given:
        return None
    if len(given) > 1:
        names = [name for name, _ in given]
        raise APIError(400, f"{' and '.join(names)}: give only one output constraint", param=names[1])
    name, spec = given[0]
    try:
        return StructuredOutputsParams(**spec)
    except TypeError as e:  # an unknown key
        raise APIError(400, f"{name}: {e}; the keys are json, regex, choice, grammar, json_object, "
                            f"disable_any_whitespace", param=name) from None


def _response_format(fmt: dict[str, Any]) -> dict[str, Any] | None:
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema.schema: must be a JSON schema object (response_format "
                                "is {'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}})",
                           param="response_format")
        return {"json": schema}
    raise APIError(400, f"response_format.type: must be 'text', 'json_object' or 'json_schema' (got {kind!r})",
                   param="response_format")


def check_context_length(max_model_len: int, num_prompt_tokens: int, max_tokens: int) -> None:
    """vLLM's 400 for a `max_tokens` that does not fit the context beside the prompt."""
    if num_prompt_tokens + max_tokens > max_model_len:
        raise RequestError(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                           f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the messages, "
                           f"{max_tokens} in the completion). Please reduce the length of the messages or "
                           f"completion.")
