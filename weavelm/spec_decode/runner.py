"""The model runner's side of speculative decoding. A runner hosts it by handing `SpecDecodeRunner` its batch (any
`SpecDecodeBatch`, see `batch.py`) and calling a few hook points:

- `forget_requests` (state update): new, preempted and finished requests lose their proposer state.
- `prepare` (before input preparation): the scheduled drafts are written after each row's known tokens, so the
  runner's ordinary input preparation feeds `[last token, d1..dk]` at positions `num_computed..`.
- `make_step`, then `SpecStep.logits_indices` / `SpecStep.sample`: logits at every position of a verified row;
  rejection sampling.
- `SpecStep.fold` and `after_step` (when the step's tokens reach the host): accepted tokens into the batch, the
  block-table tail the scheduler frees dropped (`kept_blocks`), and the next drafts proposed. `after_step` takes
  the target's hidden states at the step's logits rows when `wants_hidden_states` (the proposer drafts from them).

A step with drafts runs eagerly: the decode CUDA graphs take one query token per request (`DecodeGraphs.can_run`
refuses `max_query_len > 1`), and steps without drafts still replay them.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from weavelm.core.outputs import ModelRunnerOutput, SchedulerOutput
from weavelm.core.proposer import ProposeInput, Proposer
from weavelm.sample.logprobs import to_token_logprobs
from weavelm.sample.rejection import emitted_lists, rejection_sample, target_probs
from weavelm.sample.sampler import SamplingMetadata, apply_logits_processors, compute_logprobs, sample, select_rows
from weavelm.spec_decode.batch import SpecDecodeBatch, SpecDecodeLimits
from weavelm.spec_decode.scheduling import kept_blocks


class SpecStep:
    """One step with drafts: for each sampled row (in `rows` order) its draft tokens (maybe none)."""

    def __init__(self, drafts: list[list[int]], draft_probs: torch.Tensor | None):
        self.drafts = drafts
        self.num_drafts = [len(d) for d in drafts]
        self.draft_probs = draft_probs
        counts = np.asarray(self.num_drafts, dtype=np.int64) + 1
        self.offsets = np.cumsum(counts) - counts  # first expanded row of each sampled row
        self.counts = counts

    def logits_indices(self, rows: np.ndarray, query_end: np.ndarray, device: torch.device
                       ) -> tuple[torch.Tensor, np.ndarray]:
        """Flat-token indices whose logits are needed (every position of each row's run) and the batch row of
        each. `query_end[r]`: end offset of batch row r's tokens in the flat batch."""
        ends = np.repeat(query_end[rows], self.counts)
        within = np.arange(int(self.counts.sum())) - np.repeat(self.offsets, self.counts)
        idx = ends - np.repeat(self.counts, self.counts) + within
        return torch.from_numpy(idx.astype(np.int64)).to(device), np.repeat(rows, self.counts)

    def sample(self, logits: torch.Tensor, m: SamplingMetadata):
        """Verify the drafts; a row without drafts is sampled by `sample`, as in a step without any, so a seeded
        row draws from its generator the same way whatever its neighbours."""
        processed = apply_logits_processors(logits, m)
        probs = target_probs(processed, dataclasses.replace(m, penalties=None, logit_bias=None, banned=None, allowed=None))
        device = logits.device
        flat = [t for d in self.drafts for t in d]
        draft_ids = torch.tensor(flat, dtype=torch.int64, device=device)
        gens = {i: m.generators[int(o)] for i, (o, n) in enumerate(zip(self.offsets, self.num_drafts))
                if n and int(o) in m.generators}
        out = rejection_sample(probs, draft_ids, self.draft_probs, self.num_drafts, gens)
        undrafted = [i for i, n in enumerate(self.num_drafts) if n == 0]
        if undrafted and not m.all_greedy:
            at = torch.from_numpy(self.offsets[undrafted]).to(device)
            ids, _ = sample(processed[at], select_rows(m, at))
            out[torch.tensor(undrafted, device=device), 0] = ids
        lps = None
        if m.want_logprobs:
            req = np.repeat(np.arange(len(self.num_drafts)), self.counts)
            pos = np.arange(int(self.counts.sum())) - np.repeat(self.offsets, self.counts)
            tokens = out[torch.from_numpy(req).to(device), torch.from_numpy(pos).to(device)].clamp(min=0)
            lps = (compute_logprobs(logits.log_softmax(dim=-1), tokens, m.num_logprobs), tokens)
        return out, lps

    def fold(self, batch: SpecDecodeBatch, rows: np.ndarray, out: np.ndarray, lps
             ) -> tuple[list[list[int]], list | None]:
        """Append each row's emitted tokens to the batch; the step's sampled ids and logprobs per batch row."""
        sampled: list[list[int]] = [[] for _ in range(batch.num_reqs)]
        emitted = emitted_lists(out)
        for row, toks in zip(rows.tolist(), emitted):
            start = int(batch.num_tokens[row])
            batch.token_ids[row, start:start + len(toks)] = toks
            batch.num_tokens[row] = start + len(toks)
            sampled[row] = toks
        logprobs = None
        if lps is not None:
            lp, tokens = lps
            want = [batch.sampling_params(r).num_logprobs for r in np.repeat(rows, self.counts).tolist()]
            entries = to_token_logprobs(tokens.tolist(), lp, want)
            logprobs = [None] * batch.num_reqs
            for i, (row, toks) in enumerate(zip(rows.tolist(), emitted)):
                first = entries[int(self.offsets[i])]
                if first is not None:
                    logprobs[row] = entries[int(self.offsets[i]):int(self.offsets[i]) + len(toks)]
        return sampled, logprobs


class SpecDecodeRunner:
    """Owns the proposer and the draft distributions awaiting verification; reads and writes the runner's batch
    only through `SpecDecodeBatch`."""

    def __init__(self, proposer: Proposer, batch: SpecDecodeBatch, limits: SpecDecodeLimits):
        self.proposer = proposer
        self.batch = batch
        self.limits = limits
        self.k = proposer.num_speculative_tokens
        self.wants_hidden_states = proposer.uses_hidden_states
        self._draft_probs: dict[str, torch.Tensor] = {}

    def forget_requests(self, scheduler_output: SchedulerOutput) -> None:
        gone = set(scheduler_output.finished_req_ids) | set(scheduler_output.preempted_req_ids)
        gone.update(r.req_id for r in scheduler_output.scheduled_new_reqs)
        c = scheduler_output.scheduled_cached_reqs
        gone.update(rid for rid, resumed in zip(c.req_ids, c.resumed_from_preemption) if resumed)
        for rid in gone:
            self._draft_probs.pop(rid, None)
        if gone:
            self.proposer.forget(gone)

    def prepare(self, scheduler_output: SchedulerOutput) -> dict[str, list[int]] | None:
        """Write the scheduled drafts after each row's tokens; None when the step verifies none."""
        spec = scheduler_output.scheduled_spec_decode_tokens
        if not spec:
            return None
        batch = self.batch
        for rid, drafts in spec.items():
            row = batch.index[rid]
            start = int(batch.num_tokens[row])
            batch.token_ids[row, start:start + len(drafts)] = drafts
        return spec

    def make_step(self, spec: dict[str, list[int]], rows: np.ndarray) -> SpecStep:
        batch, device = self.batch, self.limits.device
        drafts = [spec.get(batch.req_ids[r], []) for r in rows.tolist()]
        probs = None
        if self._draft_probs:
            # Drafts whose distribution is missing (proposals carried over a failed step) are verified as point
            # masses: accepting d with probability p(d) is exact for any draft chosen independently of the
            # verification's randomness; the draft distribution only raises the acceptance rate.
            vocab = next(iter(self._draft_probs.values())).shape[-1]
            parts = []
            for r, d in zip(rows.tolist(), drafts):
                if d:
                    stored = self._draft_probs.get(batch.req_ids[r])
                    if stored is None or stored.shape[0] < len(d):
                        stored = torch.zeros(len(d), vocab, device=device)
                        stored[torch.arange(len(d), device=device), torch.tensor(d, device=device)] = 1.0
                    parts.append(stored[:len(d)])
            probs = torch.cat(parts) if parts else torch.empty(0, vocab, device=device)
        return SpecStep(drafts, probs)

    def after_step(self, out: ModelRunnerOutput, rows: np.ndarray, step: SpecStep | None,
                   hidden_states: torch.Tensor | None = None) -> None:
        """Drop the freed block-table tails, then propose the next drafts for the sampled rows. `hidden_states`:
        the target's final hidden states at the step's logits rows (one per row of `rows`, or with a `step` one per
        position of each verified run), given when `wants_hidden_states`."""
        batch, bs = self.batch, self.limits.block_size
        uses_kv = self.proposer.uses_kv_cache
        rows_list = rows.tolist()
        t0 = time.perf_counter()
        eligible, caps = [], []
        for row in rows_list:
            n = int(batch.num_tokens[row])
            max_tokens = batch.sampling_params(row).max_tokens
            cap = min(self.k, self.limits.max_model_len - n, max_tokens - (n - int(batch.num_prompt[row])) - 1)
            if uses_kv:
                cap = min(cap, int(batch.num_blocks[row]) * bs - n + 1)
            if cap > 0 and not batch.processed[row]:  # logits processors depend on the history: no drafts
                eligible.append(row)
                caps.append(cap)
        spec_ids: list[list[int]] = [[] for _ in range(batch.num_reqs)]
        self._draft_probs = {}
        if eligible:
            proposal = self.proposer.propose(self._propose_input(out, rows_list, step, eligible, caps,
                                                                 hidden_states))
            start = 0
            for row, toks, cap in zip(eligible, proposal.token_ids, caps):
                kept = [int(t) for t in toks[:cap]]
                spec_ids[row] = kept
                if proposal.probs is not None and kept:
                    self._draft_probs[batch.req_ids[row]] = proposal.probs[start:start + len(kept)]
                start += len(toks)
        out.proposer_time_s = time.perf_counter() - t0
        out.spec_token_ids = spec_ids
        # the scheduler frees the same tail (kept_blocks) for these rows
        for i, row in enumerate(rows_list):
            if uses_kv or (step is not None and step.num_drafts[i]):
                batch.keep_blocks(row, kept_blocks(int(batch.num_tokens[row]), bs))

    def _propose_input(self, out: ModelRunnerOutput, rows: list[int], step: SpecStep | None, eligible: list[int],
                       caps: list[int], hidden_states: torch.Tensor | None) -> ProposeInput:
        batch = self.batch
        e = np.asarray(eligible)
        num_tokens = batch.num_tokens[e]
        sampled = [list(out.sampled_token_ids[r]) for r in eligible]
        counts = np.fromiter((len(t) for t in sampled), dtype=np.int64, count=len(eligible))
        positions = _ranges(num_tokens - counts - 1, counts)
        hidden = None
        if self.wants_hidden_states:
            assert hidden_states is not None, "the runner must pass hidden states to a proposer that uses them"
            at = {row: i for i, row in enumerate(rows)}
            starts = np.array([step.offsets[at[r]] if step is not None else at[r] for r in eligible], dtype=np.int64)
            hidden = hidden_states[torch.from_numpy(_ranges(starts, counts)).to(hidden_states.device)]
        return ProposeInput(
            req_ids=[batch.req_ids[r] for r in eligible],
            token_ids=[batch.token_ids[r, :batch.num_tokens[r]] for r in eligible], max_tokens=caps,
            block_table=batch.block_table[e], num_blocks=batch.num_blocks[e].copy(),
            temperature=batch.temperature[e].copy(), generators=[batch.generator(r) for r in eligible],
            num_computed_tokens=num_tokens - 1, sampled_token_ids=sampled, positions=positions, hidden_states=hidden)


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The concatenated ranges [starts[i], starts[i] + counts[i]) as one int64 array."""
    return np.repeat(starts, counts) + np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
