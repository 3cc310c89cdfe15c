"""Draft-model proposer: a smaller model with the target's tokenizer, run by the same worker with its own paged KV
cache. The draft's cache has the target's block count and block size and is addressed with the target's block
tables (the scheduler reserves `num_speculative_tokens` lookahead slots for the draft's own tokens), so it needs no
block accounting of its own.

Per step, for each row: catch up (one forward over the tokens the draft has not seen: a new request's whole prompt,
else the accepted tokens of the last step), then k - 1 single-token forwards. Each draft is sampled from the
draft's distribution at the request's temperature (argmax when greedy; a seeded request draws from its own
generator) and that distribution is returned for the rejection sampler.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from weavelm.core.forward import make_layer_impl, smallest_window
from weavelm.plugin import (AttentionSpec, CommonAttentionMetadata, ConfigError, ForwardBatch, Proposal, ProposeInput,
                            Proposer, ProposerOptions, cdiv, hookimpl)


class DraftModelOptions(ProposerOptions):
    model: str = Field(..., min_length=1, description="The draft model: a directory with config.json + weights, "
                       "or a .gguf file; it must share the target's tokenizer.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="The draft's dtype; auto: the target's.")


class DraftModelProposer(Proposer):
    name = "draft_model"
    description = "A smaller model of the same tokenizer drafts tokens, with its own paged KV cache."
    Options = DraftModelOptions
    uses_kv_cache = True

    def __init__(self, options: DraftModelOptions, context):
        super().__init__(options, context)
        self.computed: dict[str, int] = {}  # tokens whose KV the draft cache holds, per request
        self.kv_caches: list[torch.Tensor] = []

    # -- setup --------------------------------------------------------------------------------------------
    def load(self, target_info: dict[str, Any]) -> None:
        rc = self.context.runner
        dtype = target_info["dtype"].removeprefix("torch.") if self.options.dtype == "auto" else self.options.dtype
        self.device = rc.device
        self.bundle = self.context.load_model(self.options.model, dtype)
        b = self.bundle
        if b.max_model_len < target_info["max_model_len"]:
            raise ConfigError([("speculative.model", f"the draft's context ({b.max_model_len}) is shorter than the "
                                f"target's max_model_len ({target_info['max_model_len']}); set max_model_len <= "
                                f"{b.max_model_len} or use another draft")])
        self.vocab_size = target_info["vocab_size"]
        if b.vocab_size > self.vocab_size:
            raise ConfigError([("speculative.model", f"the draft's vocabulary ({b.vocab_size}) is larger than the "
                                f"target's ({self.vocab_size}); the draft must use the target's tokenizer")])
        num_layers, num_heads, num_kv_heads, head_size = b.model.attention_layout()
        bs = self.context.block_size
        windows = b.model.attention_windows()
        self.backend = rc.attention_backend(AttentionSpec(self.device.type, b.dtype, head_size, num_heads,
                                                          num_kv_heads, bs, smallest_window(windows)))
        self.impls = [make_layer_impl(self.backend, num_heads, num_kv_heads, head_size, w) for w in windows]
        self.builder = self.backend.make_builder(self.device)
        self.layout = (num_layers, num_kv_heads, head_size)

    def kv_cache_bytes_per_block(self) -> int:
        num_layers, num_kv_heads, head_size = self.layout
        one = self.backend.kv_cache_shape(1, self.context.block_size, num_kv_heads, head_size)
        return num_layers * math.prod(one) * torch.empty((), dtype=self.bundle.dtype).element_size()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        num_layers, num_kv_heads, head_size = self.layout
        shape = self.backend.kv_cache_shape(num_blocks, self.context.block_size, num_kv_heads, head_size)
        self.kv_caches = [torch.zeros(shape, dtype=self.bundle.dtype, device=self.device) for _ in range(num_layers)]

    def forget(self, req_ids) -> None:
        for rid in req_ids:
            self.computed.pop(rid, None)

    # -- per step -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, inp: ProposeInput) -> Proposal:
        n = len(inp.req_ids)
        lengths = np.array([len(t) for t in inp.token_ids], dtype=np.int64)
        starts = np.array([min(self.computed.get(r, 0), int(ln) - 1) for r, ln in zip(inp.req_ids, lengths)])
        counts = lengths - starts
        tokens = np.concatenate([t[s:] for t, s in zip(inp.token_ids, starts)])
        positions = np.concatenate([np.arange(s, ln) for s, ln in zip(starts, lengths)])
        logits = self._forward(tokens, positions, np.repeat(np.arange(n), counts), inp.block_table, lengths)
        last = np.cumsum(counts) - 1
        draft_steps: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]] = []  # (rows, ids, probs) per step
        active = np.arange(n)
        cur = logits[torch.from_numpy(last).to(self.device)]
        max_k = np.asarray(inp.max_tokens)
        for step in range(int(max_k.max())):
            ids, probs = self._sample(cur, inp, active)
            draft_steps.append((active, ids, probs))
            active_next = active[max_k[active] > step + 1]
            if not len(active_next):
                break
            keep = torch.from_numpy(np.nonzero(max_k[active] > step + 1)[0]).to(self.device)
            pos = lengths[active_next] + step
            cur = self._forward(ids[keep].cpu().numpy(), pos, active_next, inp.block_table, pos + 1)
            active = active_next
        for rid, ln in zip(inp.req_ids, lengths):
            self.computed[rid] = int(ln)
        return self._collect(n, draft_steps)

    def _collect(self, n: int, draft_steps) -> Proposal:
        per_row: list[list[int]] = [[] for _ in range(n)]
        per_row_probs: list[list[torch.Tensor]] = [[] for _ in range(n)]
        for rows, ids, probs in draft_steps:
            for j, (row, tok) in enumerate(zip(rows.tolist(), ids.tolist())):
                per_row[row].append(tok)
                per_row_probs[row].append(probs[j])
        flat = [p for ps in per_row_probs for p in ps]
        probs = torch.stack(flat) if flat else torch.empty(0, self.vocab_size, device=self.device)
        return Proposal(per_row, probs)

    def _sample(self, logits: torch.Tensor, inp: ProposeInput, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits.float()
        if logits.shape[-1] < self.vocab_size:
            pad = logits.new_full((logits.shape[0], self.vocab_size - logits.shape[-1]), float("-inf"))
            logits = torch.cat([logits, pad], dim=-1)
        temp = torch.from_numpy(inp.temperature[rows]).to(self.device)
        greedy = temp == 0
        argmax = logits.argmax(dim=-1)
        one_hot = torch.zeros_like(logits).scatter_(-1, argmax[:, None], 1.0)
        probs = (logits / torch.where(greedy, 1.0, temp)[:, None]).softmax(dim=-1)
        probs = torch.where(greedy[:, None], one_hot, probs)
        noise = torch.empty_like(probs).exponential_()
        for j, row in enumerate(rows.tolist()):
            gen = inp.generators[row]
            if gen is not None:
                noise[j].exponential_(generator=gen)
        return (probs / noise).argmax(dim=-1), probs

    def _forward(self, tokens: np.ndarray, positions: np.ndarray, token_row: np.ndarray, block_table: np.ndarray,
                 seq_lens: np.ndarray) -> torch.Tensor:
        """Logits of every token of a flat batch; `token_row[t]`: the row of token t (non-decreasing),
        `seq_lens[j]`: the j-th present row's context length after this forward."""
        bs, dev = self.context.block_size, self.device
        rows, counts = np.unique(token_row, return_counts=True)
        seq_lens = np.asarray(seq_lens)
        slots = block_table[token_row, positions // bs].astype(np.int64) * bs + positions % bs
        qsl = np.zeros(len(rows) + 1, dtype=np.int32)
        qsl[1:] = np.cumsum(counts)
        max_blocks = cdiv(int(seq_lens.max()), bs)
        table = np.ascontiguousarray(block_table[rows, :max_blocks])
        common = CommonAttentionMetadata(
            query_start_loc=torch.from_numpy(qsl).to(dev), seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(dev),
            block_table=torch.from_numpy(table).to(dev), slot_mapping=torch.from_numpy(slots).to(dev),
            query_start_loc_cpu=torch.from_numpy(qsl), seq_lens_cpu=torch.from_numpy(seq_lens.astype(np.int32)),
            num_reqs=len(rows), num_actual_tokens=len(tokens), max_query_len=int(counts.max()),
            max_seq_len=int(seq_lens.max()), block_size=bs)
        fb = ForwardBatch(self.builder.build(common), self.kv_caches, self.impls)
        ids = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(dev)
        hidden = self.bundle.model(ids, torch.from_numpy(positions.astype(np.int64)).to(dev), fb)
        return self.bundle.model.compute_logits(hidden)


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("proposer", DraftModelProposer.name, DraftModelProposer)
