"""Sampling, shared by every runner and by speculative decoding: logits processors (penalties, logit bias, banned
tokens), greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs with top-N alternatives.

The host transfers are the sampled ids (and their logprobs when asked for). A seeded request draws its noise from
its own generator, and every processor works on its own row, so its tokens do not depend on what else is in the
batch. Processors run only when a row in the batch uses them (their metadata is None otherwise), so the greedy and
temperature paths pay nothing for them. Logprobs are taken from the model's unmodified distribution, before any
processor, as vLLM does by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PenaltyMetadata:
    """vLLM's penalties for the `p` rows that use them.

    rows: (p,) int64, indices into the sampled rows. presence / frequency / repetition: (p,) float32.
    token_ids: (p, L) int64, each row's prompt + output tokens, padded with `vocab_size` (an out-of-range id that
    lands in a dropped extra column). is_output: (p, L) bool, true on output tokens.
    """

    rows: torch.Tensor
    presence: torch.Tensor
    frequency: torch.Tensor
    repetition: torch.Tensor
    token_ids: torch.Tensor
    is_output: torch.Tensor
    any_repetition: bool = True  # host-side flags: skip the half of the work no row needs
    any_presence_frequency: bool = True


@dataclass
class SparseLogits:
    """Entries (rows[i], token_ids[i]) of the logits to change: add `values[i]` (logit bias) or, when `values` is
    None, set to -inf (bad words, EOS before min_tokens). All (m,) tensors."""

    rows: torch.Tensor
    token_ids: torch.Tensor
    values: torch.Tensor | None = None


@dataclass
class AllowedTokens:
    """Structured outputs: the tokens a row may sample. rows: (g,) int64 indices into the sampled rows; bitmask:
    (g, ceil(vocab / 32)) int32, bit j of word w set when token 32 * w + j is allowed (xgrammar's layout). Every
    other token of those rows is set to -inf before sampling."""

    rows: torch.Tensor
    bitmask: torch.Tensor


def apply_allowed_tokens(logits: torch.Tensor, allowed: AllowedTokens) -> None:
    """In place: -inf on the tokens `allowed` does not allow in its rows."""
    vocab = logits.shape[-1]
    shifts = torch.arange(32, dtype=torch.int32, device=allowed.bitmask.device)
    bits = (allowed.bitmask[:, :, None] >> shifts) & 1
    ok = bits.view(bits.shape[0], -1)[:, :vocab].bool()
    if ok.shape[1] < vocab:  # logits wider than the grammar's vocabulary: the extra (padding) ids are never allowed
        ok = torch.nn.functional.pad(ok, (0, vocab - ok.shape[1]), value=False)
    logits[allowed.rows] = logits[allowed.rows].masked_fill(~ok, float("-inf"))


@dataclass
class SamplingMetadata:
    """Per sampled row: (n,) tensors on the logits' device; `generators` maps row -> torch.Generator.
    `num_logprobs`: the largest top-N asked for in the batch (0: only the sampled token's logprob)."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    generators: dict[int, torch.Generator]
    want_logprobs: bool
    num_logprobs: int = 0
    penalties: PenaltyMetadata | None = None
    logit_bias: SparseLogits | None = None
    banned: SparseLogits | None = None
    step_seed: int | None = None  # set on CUDA: the seed of the one-pass Gumbel-max sampler for this step
    allowed: AllowedTokens | None = None  # structured outputs' grammar bitmask (applied last)


@dataclass
class SampledLogprobs:
    """Logprobs of one step's sampled rows, on the device. sampled: (n,) float32 logprob of the chosen token;
    sampled_rank: (n,) int64, 1 = most likely; top_ids / top_logprobs: (n, k) the k most likely tokens."""

    sampled: torch.Tensor
    sampled_rank: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor


def apply_penalties(logits: torch.Tensor, p: PenaltyMetadata) -> None:
    """In place. Repetition on prompt + output tokens (divide a positive logit, multiply a negative one, as
    transformers' RepetitionPenaltyLogitsProcessor); then logit -= frequency * count + presence * (count > 0)
    over output tokens (OpenAI's formula, as vLLM applies it)."""
    vocab = logits.shape[-1]
    sub = logits[p.rows]
    if p.any_repetition:
        seen = torch.zeros(sub.shape[0], vocab + 1, dtype=torch.bool, device=sub.device)
        seen.scatter_(1, p.token_ids, True)
        rep = p.repetition[:, None]
        sub = torch.where(seen[:, :vocab], torch.where(sub > 0, sub / rep, sub * rep), sub)
    if p.any_presence_frequency:
        out_ids = torch.where(p.is_output, p.token_ids, vocab)
        counts = torch.zeros(sub.shape[0], vocab + 1, dtype=sub.dtype, device=sub.device)
        counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=sub.dtype))
        counts = counts[:, :vocab]
        sub -= p.frequency[:, None] * counts + p.presence[:, None] * (counts > 0).to(sub.dtype)
    logits[p.rows] = sub


def apply_logits_processors(logits: torch.Tensor, m: SamplingMetadata) -> torch.Tensor:
    """The logits after logit bias, banned tokens, penalties and the grammar's bitmask (a copy when any applies,
    else `logits`)."""
    if m.penalties is None and m.logit_bias is None and m.banned is None and m.allowed is None:
        return logits
    logits = logits.clone()
    if m.logit_bias is not None:
        b = m.logit_bias
        logits.index_put_((b.rows, b.token_ids), b.values, accumulate=True)
    if m.penalties is not None:
        apply_penalties(logits, m.penalties)
    if m.banned is not None:
        logits[m.banned.rows, m.banned.token_ids] = float("-inf")
    if m.allowed is not None:
        apply_allowed_tokens(logits, m.allowed)
    return logits


def select_rows(m: SamplingMetadata, rows: torch.Tensor) -> SamplingMetadata:
    """The metadata of a subset of the rows (`rows`: (r,) int64 indices into m's rows), without logits processors
    or logprobs: for logits the processors were already applied to. Seeded rows keep their generators."""
    if m.all_greedy:
        empty = m.temperature
        return SamplingMetadata(empty, empty, empty, empty, True, False, False, False, {}, False,
                                step_seed=m.step_seed)
    position = {int(r): i for i, r in enumerate(rows.tolist())}
    gens = {position[r]: g for r, g in m.generators.items() if r in position}
    rows = rows.to(m.temperature.device)
    return SamplingMetadata(m.temperature[rows], m.top_k[rows], m.top_p[rows], m.min_p[rows], False, m.any_top_k,
                            m.any_top_p, m.any_min_p, gens, False, step_seed=m.step_seed)


def apply_top_k_top_p_min_p(logits: torch.Tensor, m: SamplingMetadata) -> torch.Tensor:
    """Mask logits outside each row's top-k / nucleus / min-p set with -inf (always keeps the argmax)."""
    if not (m.any_top_k or m.any_top_p or m.any_min_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if m.any_top_k:
        k = torch.where(m.top_k > 0, m.top_k, vocab).clamp(max=vocab)
        mask |= torch.arange(vocab, device=logits.device)[None, :] >= k[:, None]
    probs = sorted_logits.softmax(dim=-1)
    if m.any_top_p:
        cum = probs.cumsum(dim=-1)
        mask |= (cum - probs) > m.top_p[:, None]
    if m.any_min_p:
        mask |= probs < (m.min_p[:, None] * probs[:, :1])
    mask[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def compute_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> SampledLogprobs:
    """logprobs: (n, vocab) log-softmaxed; token_ids: (n,) the chosen tokens; k: top-N to return."""
    chosen = logprobs.gather(-1, token_ids[:, None])
    rank = (logprobs >= chosen).sum(-1)
    top_logprobs, top_ids = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], token_ids[:, None][:, :0])
    return SampledLogprobs(chosen.squeeze(-1), rank, top_ids, top_logprobs)


def uses_one_pass_sampler(logits: torch.Tensor, m: SamplingMetadata) -> bool:
    """Whether this batch is sampled by the one-pass Gumbel-max kernel (`ops/sampling_kernels.py`; greedy rows take
    its plain argmax, which reads the logits faster than torch's argmax): on CUDA, without top-k / top-p / min-p
    filters and without per-request seeds."""
    return (m.step_seed is not None and logits.is_cuda and not m.generators
            and not (m.any_top_k or m.any_top_p or m.any_min_p))


def sample(logits: torch.Tensor, m: SamplingMetadata) -> tuple[torch.Tensor, SampledLogprobs | None]:
    """logits: (n, vocab), float32 or the model's dtype (cast here where a path needs float32; greedy and the
    one-pass sampler read them as they are). Returns sampled ids (n,) int64 and, if asked, their logprobs (with the
    top `m.num_logprobs` alternatives) under the model's unmodified distribution."""
    one_pass = uses_one_pass_sampler(logits, m)
    processed = m.penalties is not None or m.logit_bias is not None or m.banned is not None or m.allowed is not None
    if m.want_logprobs or processed or not (m.all_greedy or one_pass):
        logits = logits.float()
    logprobs = logits.log_softmax(dim=-1) if m.want_logprobs else None
    logits = apply_logits_processors(logits, m)
    if one_pass:
        from weavelm.ops.sampling_kernels import gumbel_sample
        temperature = m.temperature if not m.all_greedy else logits.new_zeros(logits.shape[0], dtype=torch.float32)
        ids = gumbel_sample(logits, temperature, m.step_seed)
    elif m.all_greedy:
        ids = logits.argmax(dim=-1)
    elif logits.device.type == "cpu":  # one uniform number per row instead of one per token (cpu_sampling.py)
        from weavelm.sample.cpu_sampling import sample_cpu
        ids = sample_cpu(logits, m)
    else:
        ids = exponential_race(logits, m)
    lp = compute_logprobs(logprobs, ids, m.num_logprobs) if logprobs is not None else None
    return ids, lp


def exponential_race(logits: torch.Tensor, m: SamplingMetadata) -> torch.Tensor:
    """The device path: filters on the sorted, temperature-scaled logits, then argmax(p / E) with E ~ Exp(1) per
    token (a seeded row's noise from its own generator); temperature-0 rows take the argmax."""
    greedy = logits.argmax(dim=-1)
    temp = torch.where(m.temperature > 0, m.temperature, torch.ones_like(m.temperature))
    scaled = apply_top_k_top_p_min_p(logits / temp[:, None], m)
    probs = scaled.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for row, gen in m.generators.items():
        noise[row].exponential_(generator=gen)
    return torch.where(m.temperature > 0, (probs / noise).argmax(dim=-1), greedy)
