"""Requests as the engine core sees them, and the user-facing SamplingParams."""

from __future__ import annotations

import enum
import math
import numbers
import reprlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from weavelm.core.vllm_sampling import check_vllm_fields
from weavelm.errors import RequestError


INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
INT32_MAX = 2**31 - 1
MIN_TEMPERATURE = 1e-5  # below this, float32 logits / temperature overflow to inf; 0 means greedy
MAX_TEMPERATURE = 1e6  # far past the point where sampling is uniform
MAX_LOGPROBS = 20
MAX_N = 128
MAX_PENALTY = 2.0  # presence / frequency penalties, as OpenAI and vLLM bound them
MAX_REPETITION_PENALTY = 1e6
MAX_LOGIT_BIAS = 100.0
MAX_BAD_WORDS = 1024


@dataclass
class StructuredOutputsParams:
    """Constrain a request's output (vLLM's `StructuredOutputsParams`): exactly one of `json` (a JSON schema, as a
    dict or a JSON string), `regex`, `choice` (the output is one of these strings), `grammar` (EBNF / GBNF) or
    `json_object=True` (any JSON object). Compiled by the structured-output backend (xgrammar); a constraint that
    cannot compile fails its request with a RequestError naming it."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False  # JSON without optional whitespace (vLLM's option)

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise RequestError(f"structured_outputs: give exactly one of json, regex, choice, grammar, json_object "
                               f"(got {given or 'none'})")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise _bad("structured_outputs.json", self.json, "must be a JSON schema (a dict or a JSON string)")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise _bad(f"structured_outputs.{name}", value, "must be a non-empty str")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            raise _bad("structured_outputs.choice", self.choice, "must be a non-empty list of non-empty strings")
        if self.choice is not None:
            self.choice = list(self.choice)
        if self.json_object not in (None, True, False) or not isinstance(self.disable_any_whitespace, bool):
            raise _bad("structured_outputs.json_object", self.json_object, "must be True, False or None")

    @property
    def kind(self) -> str:
        """Which constraint this is: "json", "regex", "choice", "grammar" or "json_object"."""
        return next(name for name in ("json", "regex", "choice", "grammar", "json_object")
                    if getattr(self, name) not in (None, False))


@dataclass
class SamplingParams:
    """How to sample one request. Validated on construction: every field is checked for type and range, with no
    silent coercion (a bool is not an int, a float is not an int, a str is not a number). A bad value raises
    RequestError naming the field, the value and what is allowed. Every value that passes can be executed.

    - `max_tokens`: int in [1, 2**31-1].
    - `temperature`: real, 0 (greedy) or in [MIN_TEMPERATURE, MAX_TEMPERATURE].
    - `top_p`: real in (0, 1]; `min_p`: real in [0, 1].
    - `top_k`: int in [0, 2**31-1]; 0 or -1 disables.
    - `seed`: None or int in the int64 range (what every torch.Generator accepts).
    - `stop`: None, a non-empty str or a list/tuple of them; `stop_token_ids`: None or a list/tuple of ints >= 0.
    - `ignore_eos`, `include_stop_str_in_output`: bool.
    - `logprobs`: None/False (off), or an int N in [0, MAX_LOGPROBS]: each output token then carries a dict
      {token_id: Logprob} of the N most likely tokens plus the sampled one (vLLM's shape; N=0: the sampled token
      only). `True` is accepted for backward compatibility and means 0.
    - `prompt_logprobs`: None or an int N in [0, MAX_LOGPROBS]: the same for every prompt token (the first is None).
      Such a request does not read the prefix cache (its logits are needed at every prompt position).
    - `priority`: int in the int64 range.
    - `n`: int in [1, MAX_N]: completions per prompt (seeded children use seed, seed+1, ...).
    - `presence_penalty`, `frequency_penalty`: real in [-2, 2] (0 disables), applied on output tokens as vLLM
      does: logit -= presence * (count > 0) + frequency * count.
    - `repetition_penalty`: real in (0, MAX_REPETITION_PENALTY] (1 disables), on prompt and output tokens as
      vLLM / transformers do: a seen token's logit is divided by it when positive, multiplied when negative.
    - `min_tokens`: int in [0, max_tokens]: EOS and `stop_token_ids` are masked until that many tokens exist.
    - `logit_bias`: None or a dict {token_id: bias}, bias real in [-100, 100], added to the logits; token ids are
      checked against the vocabulary when the request is added.
    - `bad_words`: None or a list of non-empty strings; tokenized when the request is added (with and without a
      leading space); a word's last token is banned whenever the output ends with the word's other tokens.
    - `structured_outputs`: None or a `StructuredOutputsParams` (or a dict of its fields): the output follows that
      JSON schema, regex, choice or grammar.

    Integral / real numpy scalars are accepted and stored as Python int / float.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool | int | None = None
    priority: int = 0
    include_stop_str_in_output: bool = False
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputsParams | None = None
    # vLLM's remaining arguments, accepted at vLLM's defaults; other values are refused as unsupported, except
    # `truncate_prompt_tokens` (keep the prompt's last N tokens), `best_of` == n and `extra_args` (kept for plugins)
    best_of: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logits_processors: Any = None
    truncate_prompt_tokens: int | None = None
    output_kind: Any = None  # RequestOutputKind.CUMULATIVE (None: the same)
    output_text_buffer_length: int = 0
    guided_decoding: Any = None
    allowed_token_ids: list[int] | None = None
    extra_args: dict[str, Any] | None = None
    # Set by the frontend when the request is added (not user fields): EOS + stop ids that `min_tokens` masks, and
    # `bad_words` as token sequences.
    min_tokens_stop_ids: list[int] = field(default_factory=list, repr=False, compare=False)
    bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.max_tokens = _int("max_tokens", self.max_tokens, 1, INT32_MAX,
                               "must be an integer in [1, 2**31-1]; ask for at least one token")
        self.temperature = _temperature(self.temperature)
        self.top_p = _real("top_p", self.top_p, "must be a number in (0, 1]; use 1 to disable nucleus sampling",
                           lambda x: 0 < x <= 1)
        self.min_p = _real("min_p", self.min_p, "must be a number in [0, 1]; use 0 to disable", lambda x: 0 <= x <= 1)
        top_k_rule = "must be an integer in [0, 2**31-1] (0 or -1 disables top-k)"
        self.top_k = 0 if _is_int(self.top_k) and self.top_k == -1 else _int("top_k", self.top_k, 0, INT32_MAX,
                                                                              top_k_rule)
        if self.seed is not None:
            self.seed = _int("seed", self.seed, INT64_MIN, INT64_MAX, "must be None or an integer in [-2**63, 2**63-1]")
        self.stop = _stop_strings(self.stop)
        self.stop_token_ids = _token_ids("stop_token_ids", self.stop_token_ids)
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "must be True or False")
        if self.logprobs is not None and not isinstance(self.logprobs, bool):
            self.logprobs = _int("logprobs", self.logprobs, 0, MAX_LOGPROBS,
                                 f"must be None, a bool or an integer in [0, {MAX_LOGPROBS}] (alternatives per "
                                 f"token)")
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = _int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS,
                                        f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        self.priority = _int("priority", self.priority, INT64_MIN, INT64_MAX,
                             "must be an integer in [-2**63, 2**63-1]; lower runs first")
        self.n = _int("n", self.n, 1, MAX_N, f"must be an integer in [1, {MAX_N}] (completions per prompt)")
        for name in ("presence_penalty", "frequency_penalty"):
            setattr(self, name, _real(name, getattr(self, name), "must be a number in [-2, 2]; 0 disables",
                                      lambda x: -MAX_PENALTY <= x <= MAX_PENALTY))
        self.repetition_penalty = _real("repetition_penalty", self.repetition_penalty,
                                        f"must be a number in (0, {MAX_REPETITION_PENALTY:g}]; 1 disables",
                                        lambda x: 0 < x <= MAX_REPETITION_PENALTY)
        self.min_tokens = _int("min_tokens", self.min_tokens, 0, self.max_tokens,
                               f"must be an integer in [0, max_tokens={self.max_tokens}]")
        self.logit_bias = _logit_bias(self.logit_bias)
        self.bad_words = _bad_words(self.bad_words)
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise _bad("structured_outputs", self.structured_outputs, "must be None or a StructuredOutputsParams")
        check_vllm_fields(self)
        for name in ("min_tokens_stop_ids", "bad_words_token_ids"):
            if not isinstance(getattr(self, name), list):
                raise _bad(name, getattr(self, name), "is set by the engine; leave it out")

    @property
    def num_logprobs(self) -> int | None:
        """Alternatives per output token (None: no logprobs); `True` means 0, `False` means None."""
        if self.logprobs is None or self.logprobs is False:
            return None
        return 0 if self.logprobs is True else self.logprobs

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def skip_reading_prefix_cache(self) -> bool:
        """vLLM's rule: prompt logprobs need logits at every prompt position, so cached prefixes are recomputed."""
        return self.prompt_logprobs is not None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def show_value(value: Any) -> str:
    try:
        return reprlib.repr(value)
    except Exception:  # e.g. an int too long for str()
        return f"<{type(value).__name__}>"


def _bad(field_name: str, value: Any, rule: str) -> RequestError:
    return RequestError(f"SamplingParams.{field_name}: {rule} (got {show_value(value)})")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int(field_name: str, value: Any, lo: int, hi: int, rule: str) -> int:
    if not _is_int(value) or not lo <= int(value) <= hi:
        raise _bad(field_name, value, rule)
    return int(value)


def _real(field_name: str, value: Any, rule: str, ok: Callable[[float], bool]) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _bad(field_name, value, rule)
    try:
        x = float(value)
    except (OverflowError, ValueError):
        raise _bad(field_name, value, rule) from None
    if not math.isfinite(x) or not ok(x):
        raise _bad(field_name, value, rule)
    return x


def _temperature(value: Any) -> float:
    rule = (f"must be 0 (greedy) or a number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]; smaller positive "
            f"values overflow the sampler")
    return _real("temperature", value, rule, lambda x: x == 0 or MIN_TEMPERATURE <= x <= MAX_TEMPERATURE)


def _stop_strings(value: Any) -> list[str]:
    rule = "must be None, a non-empty string or a list of non-empty strings"
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
        raise _bad("stop", value, rule)
    return list(items)


def _logit_bias(value: Any) -> dict[int, float] | None:
    rule = "must be None or a dict {token_id: bias} with integer ids >= 0 and biases in [-100, 100]"
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > INT32_MAX:
        raise _bad("logit_bias", value, rule)
    out = {}
    for tok, bias in value.items():
        if not _is_int(tok) or not 0 <= tok <= INT64_MAX:
            raise _bad("logit_bias", value, rule)
        out[int(tok)] = _real("logit_bias", bias, rule, lambda x: -MAX_LOGIT_BIAS <= x <= MAX_LOGIT_BIAS)
    return out


def _bad_words(value: Any) -> list[str] | None:
    rule = f"must be None or a list of at most {MAX_BAD_WORDS} non-empty strings"
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) > MAX_BAD_WORDS
            or not all(isinstance(w, str) and w.strip() for w in value)):
        raise _bad("bad_words", value, rule)
    return list(value)


def _token_ids(field_name: str, value: Any) -> list[int]:
    rule = "must be None or a list of integer token ids >= 0"
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(_is_int(t) and 0 <= t <= INT64_MAX for t in value):
        raise _bad(field_name, value, rule)
    return [int(t) for t in value]


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # everything above this line is unfinished
    FINISHED_STOPPED = 10
    FINISHED_LENGTH = 11
    FINISHED_ABORTED = 12
    FINISHED_ERROR = 13

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
            RequestStatus.FINISHED_ERROR: "error",
        }.get(self)


class Request:
    """One request's state inside the engine core. Owned by the scheduler."""

    __slots__ = (
        "request_id", "prompt_token_ids", "output_token_ids", "all_token_ids", "sampling_params",
        "eos_token_id", "arrival_time", "status", "num_computed_tokens", "num_cached_tokens",
        "num_preemptions", "block_hashes", "stop_reason", "logprobs", "lora_request", "num_output_placeholders",
        "mm_features",
    )

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 eos_token_id: int | None = None, arrival_time: float | None = None, lora_request: Any = None,
                 mm_features: list | None = None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hits at first scheduling; -1 until scheduled
        self.num_preemptions = 0
        self.block_hashes: list[int] = []
        self.stop_reason: int | str | None = None
        self.logprobs: list = []  # per output token: {token_id: Logprob} (weavelm.core.outputs)
        self.lora_request = lora_request  # weavelm.LoRARequest or None (the base model)
        # async scheduling: tokens sampled by launched steps whose output has not been folded in yet
        self.num_output_placeholders = 0
        # multimodal items (weavelm.core.multimodal.MultiModalFeature), in prompt order; None: text only
        self.mm_features = mm_features or None

    @property
    def priority(self) -> int:
        return self.sampling_params.priority

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def is_finished(self) -> bool:
        return self.status.finished

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens})")
