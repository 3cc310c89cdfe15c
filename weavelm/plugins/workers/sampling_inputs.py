"""Host side of sampling: SamplingMetadata from the persistent batch's rows (logprob tensors go back into
{token_id: Logprob} dicts with `weavelm.sample.logprobs.to_token_logprobs`).

The per-row Python work runs only for rows that use a feature (penalties, logit bias, bad words, min_tokens,
logprobs); a batch that uses none builds the same metadata as before these features existed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from weavelm.plugins.workers.input_batch import InputBatch
from weavelm.sample.sampler import PenaltyMetadata, SamplingMetadata, SparseLogits


def build_sampling_metadata(b: InputBatch, rows: np.ndarray, device: torch.device, vocab_size: int,
                            to_device: Callable[[np.ndarray], torch.Tensor] | None = None,
                            step_seed: int | None = None) -> SamplingMetadata:
    """Metadata for sampling `rows` of the batch; `vocab_size` is the logits' width. `to_device` copies a host
    array to the device (the runner's asynchronous copy; default: a plain `.to(device)`). `step_seed`: the seed
    of this step's unseeded noise for the one-pass sampler (None: the torch path)."""
    to_device = to_device or (lambda a: torch.from_numpy(a).to(device))
    temp = b.temperature[rows]
    all_greedy = bool((temp == 0).all())
    want_logprobs = bool(b.logprobs[rows].any())
    num_logprobs = int(b.num_logprobs[rows].max()) if want_logprobs else 0
    processors = _processors(b, rows, device, vocab_size) if b.processed[rows].any() else {}
    if all_greedy:  # argmax only: no per-row sampling tensors to send
        empty = torch.empty(0, device=device)
        return SamplingMetadata(empty, empty, empty, empty, True, False, False, False, {}, want_logprobs,
                                num_logprobs, step_seed=step_seed, **processors)
    top_k, top_p, min_p = b.top_k[rows], b.top_p[rows], b.min_p[rows]
    seeded = np.nonzero(b.seeded[rows])[0]
    gens = {int(i): b.states[int(rows[i])].generator for i in seeded}
    floats = to_device(np.stack([temp, top_p, min_p]))  # one copy for the three float rows
    return SamplingMetadata(
        temperature=floats[0], top_k=to_device(top_k), top_p=floats[1], min_p=floats[2],
        all_greedy=False, any_top_k=bool((top_k > 0).any()), any_top_p=bool((top_p < 1).any()),
        any_min_p=bool((min_p > 0).any()), generators=gens, want_logprobs=want_logprobs,
        num_logprobs=num_logprobs, step_seed=step_seed, **processors)


def _processors(b: InputBatch, rows: np.ndarray, device: torch.device, vocab: int) -> dict:
    pen_rows, bias, banned = [], ([], [], []), ([], [])
    for i in np.nonzero(b.processed[rows])[0].tolist():
        row = int(rows[i])
        sp = b.states[row].sampling_params
        if sp.uses_penalties:
            pen_rows.append(i)
        if sp.logit_bias:
            bias[0].extend([i] * len(sp.logit_bias))
            bias[1].extend(sp.logit_bias)
            bias[2].extend(sp.logit_bias.values())
        output = b.output_token_ids(row)
        if sp.min_tokens and len(output) < sp.min_tokens:
            banned[0].extend([i] * len(sp.min_tokens_stop_ids))
            banned[1].extend(sp.min_tokens_stop_ids)
        for word in sp.bad_words_token_ids:
            prefix = word[:-1]
            if len(output) >= len(prefix) and (not prefix or output[len(output) - len(prefix):].tolist() == prefix):
                banned[0].append(i)
                banned[1].append(word[-1])
    out = {}
    if pen_rows:
        out["penalties"] = _penalties(b, rows, pen_rows, device, vocab)
    if bias[0]:
        out["logit_bias"] = SparseLogits(torch.tensor(bias[0], device=device), torch.tensor(bias[1], device=device),
                                         torch.tensor(bias[2], dtype=torch.float32, device=device))
    if banned[0]:
        out["banned"] = SparseLogits(torch.tensor(banned[0], device=device), torch.tensor(banned[1], device=device))
    return out


def _penalties(b: InputBatch, rows: np.ndarray, pen_rows: list[int], device: torch.device, vocab: int
               ) -> PenaltyMetadata:
    batch_rows = rows[pen_rows]
    lengths = b.num_tokens[batch_rows]
    width = int(lengths.max())
    cols = np.arange(width)[None, :]
    token_ids = np.where(cols < lengths[:, None], b.token_ids[batch_rows, :width], vocab)
    is_output = (cols >= b.num_prompt[batch_rows][:, None]) & (cols < lengths[:, None])
    sps = [b.states[int(r)].sampling_params for r in batch_rows]
    values = np.array([[sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty] for sp in sps],
                      dtype=np.float32)
    v = torch.from_numpy(values).to(device)
    return PenaltyMetadata(torch.tensor(pen_rows, device=device), v[:, 0], v[:, 1], v[:, 2],
                           torch.from_numpy(token_ids).to(device), torch.from_numpy(is_output).to(device),
                           any_repetition=bool((values[:, 2] != 1).any()),
                           any_presence_frequency=bool((values[:, :2] != 0).any()))
