"""The runner's persistent batch (vLLM's InputBatch): one row per request in the running batch, holding its token
ids, block table and sampling parameters in host arrays, updated from SchedulerOutput deltas."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from weavelm.core.request import SamplingParams
from weavelm.ops.memory import check_fits


@dataclass
class CachedRequestState:
    """What the runner keeps about a request between steps, also while it is preempted. While the request has a
    batch row, the row's token ids are authoritative; `output_token_ids` is brought up to date when it leaves."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    # prompt_logprobs: entry j is for prompt token j (None until computed; j = 0 stays None); None once sent
    prompt_logprobs: list | None = None
    lora_request: Any = None  # weavelm.LoRARequest or None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)


class InputBatch:
    """The default runner's persistent batch; speculative decoding reads and writes it as a
    `weavelm.spec_decode.batch.SpecDecodeBatch`."""

    def __init__(self, max_num_reqs: int, max_model_len: int, max_blocks_per_req: int):
        self.max_num_reqs = max_num_reqs
        check_fits(max_num_reqs * (max_model_len + 1) * 8, "cpu", "max_model_len",
                   f"max_model_len={max_model_len} x max_num_seqs={max_num_reqs} rows of token ids",
                   "set a smaller max_model_len (it defaults to the model's max_position_embeddings)")
        self.token_ids = np.zeros((max_num_reqs, max_model_len + 1), dtype=np.int64)
        self.num_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_computed = np.zeros(max_num_reqs, dtype=np.int64)
        self.block_table = np.zeros((max_num_reqs, max_blocks_per_req), dtype=np.int32)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int64)
        self.temperature = np.zeros(max_num_reqs, dtype=np.float32)
        self.top_p = np.ones(max_num_reqs, dtype=np.float32)
        self.top_k = np.zeros(max_num_reqs, dtype=np.int64)
        self.min_p = np.zeros(max_num_reqs, dtype=np.float32)
        self.logprobs = np.zeros(max_num_reqs, dtype=bool)
        self.num_logprobs = np.zeros(max_num_reqs, dtype=np.int64)
        self.seeded = np.zeros(max_num_reqs, dtype=bool)
        self.num_prompt = np.zeros(max_num_reqs, dtype=np.int64)
        # rows that need a logits processor (penalties, logit_bias, bad_words, min_tokens) or prompt logprobs
        self.processed = np.zeros(max_num_reqs, dtype=bool)
        self.wants_prompt_logprobs = np.zeros(max_num_reqs, dtype=bool)
        self.req_ids: list[str] = []  # row order; rows [0, len) are occupied
        self.index: dict[str, int] = {}
        self.states: list[CachedRequestState] = []

    def output_token_ids(self, row: int) -> np.ndarray:
        return self.token_ids[row, self.num_prompt[row]:self.num_tokens[row]]

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)

    def sampling_params(self, row: int) -> SamplingParams:
        return self.states[row].sampling_params

    def generator(self, row: int) -> torch.Generator | None:
        return self.states[row].generator

    def keep_blocks(self, row: int, num_blocks: int) -> None:
        if self.num_blocks[row] > num_blocks:
            self.num_blocks[row] = num_blocks
            del self.states[row].block_ids[num_blocks:]

    def add(self, s: CachedRequestState) -> None:
        row = len(self.req_ids)
        if row >= self.max_num_reqs:
            raise RuntimeError(f"persistent batch is full ({self.max_num_reqs} rows)")
        self.req_ids.append(s.req_id)
        self.states.append(s)
        self.index[s.req_id] = row
        n_prompt = len(s.prompt_token_ids)
        self.token_ids[row, :n_prompt] = s.prompt_token_ids
        self.token_ids[row, n_prompt:s.num_tokens] = s.output_token_ids
        self.num_tokens[row] = s.num_tokens
        self.num_computed[row] = s.num_computed_tokens
        self.set_blocks(row, s.block_ids)
        sp = s.sampling_params
        self.temperature[row] = sp.temperature
        self.top_p[row] = sp.top_p
        self.top_k[row] = sp.top_k
        self.min_p[row] = sp.min_p
        self.logprobs[row] = sp.num_logprobs is not None
        self.num_logprobs[row] = sp.num_logprobs or 0
        self.seeded[row] = s.generator is not None
        self.num_prompt[row] = n_prompt
        self.processed[row] = bool(sp.uses_penalties or sp.logit_bias or sp.bad_words_token_ids
                                   or (sp.min_tokens and sp.min_tokens_stop_ids))
        self.wants_prompt_logprobs[row] = s.prompt_logprobs is not None

    def set_blocks(self, row: int, block_ids: list[int]) -> None:
        self.block_table[row, :len(block_ids)] = block_ids
        self.num_blocks[row] = len(block_ids)

    def append_blocks(self, row: int, block_ids: list[int]) -> None:
        start = int(self.num_blocks[row])
        self.block_table[row, start:start + len(block_ids)] = block_ids
        self.num_blocks[row] = start + len(block_ids)

    def remove(self, req_ids: set[str]) -> None:
        """Drop rows, filling each hole with the last row (only moved rows are copied)."""
        rows = sorted((self.index[r] for r in req_ids if r in self.index), reverse=True)
        arrays = (self.token_ids, self.num_tokens, self.num_computed, self.block_table, self.num_blocks,
                  self.temperature, self.top_p, self.top_k, self.min_p, self.logprobs, self.num_logprobs, self.seeded,
                  self.num_prompt, self.processed, self.wants_prompt_logprobs)
        for row in rows:
            s = self.states[row]
            s.output_token_ids = self.token_ids[row, len(s.prompt_token_ids):self.num_tokens[row]].tolist()
            last = len(self.req_ids) - 1
            del self.index[self.req_ids[row]]
            if row != last:
                for arr in arrays:
                    arr[row] = arr[last]
                self.req_ids[row] = self.req_ids[last]
                self.states[row] = self.states[last]
                self.index[self.req_ids[row]] = row
            self.req_ids.pop()
            self.states.pop()
