"""Incremental detokenization and stop-string detection for one request (frontend side)."""

from __future__ import annotations

from typing import Any

CONTEXT_TOKENS = 5  # prompt tokens decoded with the output so leading spaces come out right


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], stop: list[str],
                 include_stop_str: bool = False, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.stop = stop
        self.include_stop_str = include_stop_str
        self.skip_special = skip_special_tokens
        self.max_stop_len = max((len(s) for s in stop), default=0)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add_tokens(self, token_ids: list[int]) -> str | None:
        """Append tokens; return the stop string that appeared (text is then truncated), else None."""
        if self.tokenizer is None:
            return None
        start = len(self.text)
        for tok in token_ids:
            self.ids.append(tok)
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            full = self._decode(self.ids[self.prefix_offset:])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                self.text += full[len(prefix):]
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._check_stop(start)

    def _check_stop(self, new_text_start: int) -> str | None:
        if not self.stop or len(self.text) == new_text_start:
            return None
        search_from = max(0, new_text_start - self.max_stop_len + 1)
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.text.find(s, search_from)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[: i + len(s)] if self.include_stop_str else self.text[:i]
        return s
