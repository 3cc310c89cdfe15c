"""The xgrammar backend: a request's `StructuredOutputsParams` compiled against the engine's tokenizer into a
`CompiledGrammar` (cached by kind and spec), and the per-request matcher that follows the output token by token.

Used on both sides of the engine: the input processor compiles every constrained request when it is added (a
constraint that cannot compile fails that request with a `StructuredOutputError` naming it, before anything is
queued), and the model runner compiles it again (a cache hit in one process) to drive the matcher that fills the
request's rows of the token bitmask.
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from typing import Any

import torch

from weavelm.core.request import StructuredOutputsParams
from weavelm.errors import RequestError

logger = logging.getLogger("weavelm.structured")
MAX_CACHED_GRAMMARS = 256


class StructuredOutputError(RequestError):
    """A structured-output constraint that cannot be compiled (bad JSON schema, regex or EBNF grammar)."""


def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:  # the `structured` extra is not installed
        raise StructuredOutputError("structured_outputs: needs the xgrammar package; install it with "
                                    "`pip install 'weavelm[structured]'`") from e
    return xgrammar


def cache_key(params: StructuredOutputsParams) -> tuple[str, str, bool]:
    """(kind, canonical spec, disable_any_whitespace): equal constraints share one compiled grammar."""
    kind = params.kind
    value = getattr(params, kind)
    if kind == "json" and isinstance(value, dict):
        value = json.dumps(value, sort_keys=True)
    elif kind == "choice":
        value = json.dumps(value)
    return kind, str(value), params.disable_any_whitespace


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly `choices` (each a JSON-escaped string literal)."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


class GrammarCompiler:
    """Compiles constraints for one tokenizer, keeping the last `MAX_CACHED_GRAMMARS` compiled grammars.

    `tokenizer`: a transformers tokenizer; `vocab_size`: the model's vocabulary (its logits' width, which may exceed
    the tokenizer's); `stop_token_ids`: the tokens that end a generation (the grammar allows them once complete)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int] | None = None):
        xgr = _xgrammar()
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=stop_token_ids or None)
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        self._cache: OrderedDict[tuple, Any] = OrderedDict()

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self.info.stop_token_ids)

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The `xgrammar.CompiledGrammar` of `params`; raises StructuredOutputError naming the constraint."""
        key = cache_key(params)
        compiled = self._cache.get(key)
        if compiled is not None:
            self._cache.move_to_end(key)
            return compiled
        kind, spec, no_ws = key
        c = self._compiler
        try:
            if kind == "json":
                compiled = c.compile_json_schema(spec, any_whitespace=not no_ws)
            elif kind == "json_object":
                compiled = c.compile_json_schema('{"type": "object"}', any_whitespace=not no_ws)
            elif kind == "regex":
                compiled = c.compile_regex(spec)
            elif kind == "choice":
                compiled = c.compile_grammar(choice_grammar(params.choice))
            else:
                compiled = c.compile_grammar(spec)
        except Exception as e:  # xgrammar raises RuntimeError / ValueError with the parser's message
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            message = re.sub(r"^\[[\d:.]+\]\s*\S+:\d+:\s*", "", message)  # xgrammar's "[time] file.cc:line:"
            shown = spec if len(spec) <= 200 else spec[:200] + "..."
            raise StructuredOutputError(f"structured_outputs.{kind}: cannot compile {shown!r}: {message}") from e
        self._cache[key] = compiled
        if len(self._cache) > MAX_CACHED_GRAMMARS:
            self._cache.popitem(last=False)
        return compiled

    def matcher(self, params: StructuredOutputsParams, extra_stop_token_ids: list[int] = ()) -> RequestGrammar:
        """A fresh matcher for one request; `extra_stop_token_ids` (the request's own stop ids) also end it."""
        compiled = self.compile(params)
        stops = self.stop_token_ids + [t for t in extra_stop_token_ids if t not in self.stop_token_ids]
        return RequestGrammar(_xgrammar().GrammarMatcher(compiled, override_stop_tokens=stops or None,
                                                         max_rollback_tokens=-1))


class RequestGrammar:
    """One request's grammar state: the matcher advanced over the request's output tokens so far
    (`num_accepted`). A token the grammar rejects (only possible for tokens not sampled under the mask, e.g. after
    an error) leaves the request unconstrained from then on rather than failing the step."""

    def __init__(self, matcher: Any):
        self.matcher = matcher
        self.num_accepted = 0
        self.broken = False

    def advance(self, tokens) -> None:
        """Accept `tokens`, the request's next output tokens."""
        for tok in tokens:
            self.num_accepted += 1
            if self.broken or self.matcher.is_terminated():
                continue
            if not self.matcher.accept_token(int(tok)):
                logger.warning("structured output: token %d is outside the grammar; the rest of the request is "
                               "unconstrained", int(tok))
                self.broken = True

    def valid_prefix(self, drafts: list[int]) -> int:
        """How many of `drafts` (tokens that would follow the current state) the grammar accepts in a row; the
        state is left unchanged (vLLM's rule: drafts past the first rejected one are cut)."""
        if self.broken:
            return len(drafts)
        n = 0
        for tok in drafts:
            if self.matcher.is_terminated() or not self.matcher.accept_token(int(tok)):
                break
            n += 1
        if n:
            self.matcher.rollback(n)
        return n

    def fill(self, bitmask: torch.Tensor, index: int, drafts: list[int] = ()) -> None:
        """Fill rows `index` .. `index + len(drafts)` of `bitmask` (int32, on the host, preset to all-allowed):
        the tokens allowed next, then after each draft the grammar accepts. The rows after a rejected draft stay
        all-allowed (the row before rejects that draft, so verification never reaches them), as do the rows of a
        terminated or broken grammar (a token past the end is dropped by the scheduler's stop check)."""
        m = self.matcher
        if self.broken:
            return
        accepted = 0
        for i in range(len(drafts) + 1):
            if m.is_terminated():
                break
            m.fill_next_token_bitmask(bitmask, index + i)
            if i == len(drafts) or not m.accept_token(int(drafts[i])):
                break
            accepted += 1
        if accepted:
            m.rollback(accepted)

    @property
    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()
