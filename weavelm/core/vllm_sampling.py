"""vLLM's `SamplingParams` arguments beyond weavelm's own: each is accepted at vLLM's default (so ported code runs)
and refused with a RequestError saying it is unsupported at any other value, except the few weavelm implements
(`best_of` equal to `n`, `truncate_prompt_tokens`, `extra_args`)."""

from __future__ import annotations

import enum
import numbers
from typing import Any

from weavelm.errors import RequestError


class RequestOutputKind(enum.IntEnum):
    """vLLM's output kinds. weavelm's outputs are cumulative (`LLM.generate` returns the final one, `LLM.stream` and
    the server the growing ones), so only CUMULATIVE is accepted."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


# field -> (values accepted silently, why another value is unsupported)
DEFAULT_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "detokenize": ((True,), "weavelm always detokenizes"),
    "skip_special_tokens": ((True,), "weavelm's outputs always skip special tokens"),
    "spaces_between_special_tokens": ((True,), "weavelm's outputs always skip special tokens"),
    "logits_processors": ((None,), "per-request logits processors are not supported; use logit_bias, bad_words, "
                                   "allowed_token_ids or structured_outputs"),
    "output_kind": ((None, RequestOutputKind.CUMULATIVE), "weavelm's outputs are cumulative (LLM.generate returns "
                                                          "the final one)"),
    "output_text_buffer_length": ((0,), "it is vLLM-internal"),
    "guided_decoding": ((None,), "pass structured_outputs=StructuredOutputsParams(...) instead"),
    "allowed_token_ids": ((None,), "use logit_bias, bad_words or structured_outputs(choice=...)"),
}


def check_vllm_fields(params: Any) -> None:
    """Validate a SamplingParams' vLLM-only fields in place; RequestError naming the field otherwise."""
    for name, (accepted, why) in DEFAULT_ONLY.items():
        value = getattr(params, name)
        if not any(value is a or (type(value) is type(a) and value == a) for a in accepted):
            raise RequestError(f"SamplingParams.{name}: {value!r} is unsupported: {why}; leave it at its default")
    if params.output_kind is None:
        params.output_kind = RequestOutputKind.CUMULATIVE
    if params.best_of is not None and not (_is_int(params.best_of) and params.best_of == params.n):
        raise RequestError(f"SamplingParams.best_of: {params.best_of!r} is unsupported (as in vLLM v1): weavelm "
                           f"returns all n={params.n} completions; leave best_of None or equal to n")
    t = params.truncate_prompt_tokens
    if t is not None and not (_is_int(t) and t >= 1):
        raise RequestError(f"SamplingParams.truncate_prompt_tokens: must be None or an integer >= 1 (the prompt's "
                           f"last tokens to keep) (got {t!r})")
    if params.extra_args is not None and not isinstance(params.extra_args, dict):
        raise RequestError(f"SamplingParams.extra_args: must be None or a dict "
                           f"(got {type(params.extra_args).__name__})")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
