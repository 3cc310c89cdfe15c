"""The model runner's side of structured outputs: one grammar matcher per constrained request, kept in step with
the request's tokens in the runner's batch, and the allowed-token bitmask of a step's sampled rows.

Why worker-side: the runner already holds every request's tokens and, with async scheduling, already waits for the
previous step's samples before applying history-dependent logits processors. The bitmask is filled on the host
after the step's forward has been launched (so while the device runs it) and before sampling, from tokens the
runner has at that point; nothing crosses the executor boundary, and no row has to sit out a step because its
previous token is still on the device.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from weavelm.core.request import SamplingParams
from weavelm.sample.sampler import AllowedTokens
from weavelm.structured.backend import GrammarCompiler, RequestGrammar


def load_tokenizer(config: Any, loader: Any) -> Any:
    """The engine's tokenizer as the input processor loads it: the configured one, else the loader's, else the
    transformers tokenizer beside the weights."""
    from transformers import AutoTokenizer

    if not config.tokenizer:
        tok = loader.load_tokenizer(config.model)
        if tok is not None:
            return tok
    return AutoTokenizer.from_pretrained(config.tokenizer or config.model, local_files_only=True,
                                         trust_remote_code=False)


class StructuredOutputs:
    """Per-runner grammar state. `make_compiler()` builds the `GrammarCompiler` on the first constrained request
    (loading the tokenizer then, so an engine that never sees one never pays for it)."""

    def __init__(self, make_compiler: Callable[[], GrammarCompiler]):
        self._make_compiler = make_compiler
        self._compiler: GrammarCompiler | None = None
        self.grammars: dict[str, RequestGrammar] = {}

    def add_request(self, req_id: str, params: SamplingParams) -> None:
        """Start a new request's matcher (its constraint was validated when the request was added)."""
        so = params.structured_outputs
        if so is None:
            return
        if self._compiler is None:
            self._compiler = self._make_compiler()
        self.grammars[req_id] = self._compiler.matcher(so, params.stop_token_ids)

    def remove(self, req_ids) -> None:
        for rid in req_ids:
            self.grammars.pop(rid, None)

    def has_rows(self, req_ids: list[str], rows: np.ndarray) -> bool:
        """Whether any of the batch `rows` is constrained."""
        grammars = self.grammars
        return bool(grammars) and any(req_ids[r] in grammars for r in rows.tolist())

    def _catch_up(self, grammar: RequestGrammar, batch: Any, row: int) -> None:
        """Advance the matcher over the row's output tokens it has not seen yet."""
        start = int(batch.num_prompt[row]) + grammar.num_accepted
        end = int(batch.num_tokens[row])
        if end > start:
            grammar.advance(batch.token_ids[row, start:end].tolist())

    def allowed_tokens(self, batch: Any, rows: np.ndarray, device: torch.device,
                       drafts: list[list[int]] | None = None) -> AllowedTokens | None:
        """The bitmask of the constrained rows among the step's sampled `rows`; with `drafts` (a verified step,
        one list per row of `rows`) one logits row per position of each run: [last token, d1, .., dk]."""
        grammars = self.grammars
        if not grammars:
            return None
        entries: list[tuple[int, RequestGrammar, list[int]]] = []
        position = 0
        for i, row in enumerate(rows.tolist()):
            d = drafts[i] if drafts is not None else []
            g = grammars.get(batch.req_ids[row])
            if g is not None:
                self._catch_up(g, batch, row)
                entries.append((position, g, d))
            position += len(d) + 1
        if not entries:
            return None
        num = sum(len(d) + 1 for _, _, d in entries)
        words = (self._compiler.vocab_size + 31) // 32
        bitmask = torch.full((num, words), -1, dtype=torch.int32)
        logits_rows: list[int] = []
        k = 0
        for start, g, d in entries:
            g.fill(bitmask, k, d)
            logits_rows.extend(range(start, start + len(d) + 1))
            k += len(d) + 1
        return AllowedTokens(torch.tensor(logits_rows, dtype=torch.int64).to(device),
                             bitmask.to(device, non_blocking=True))

    def cut_drafts(self, batch: Any, spec_token_ids: list[list[int]] | None) -> None:
        """Cut each constrained row's proposed drafts at the first token its grammar rejects (in place; rows are
        batch rows, whose tokens hold the step's accepted output)."""
        if not spec_token_ids or not self.grammars:
            return
        for row, drafts in enumerate(spec_token_ids):
            if not drafts:
                continue
            g = self.grammars.get(batch.req_ids[row])
            if g is None:
                continue
            self._catch_up(g, batch, row)
            n = g.valid_prefix(drafts)
            if n < len(drafts):
                del drafts[n:]
