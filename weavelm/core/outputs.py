"""The data that crosses stage boundaries. Plain dataclasses of builtins, so they pickle cheaply when an executor
sends them to workers in other processes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from weavelm.core.request import SamplingParams


class Logprob(float):
    """One token's log-probability. A float (so `lp[tok] < 0`, `math.isclose(lp[tok], x)` work) that also carries
    vLLM's `Logprob` attributes: `.logprob` (the value), `.rank` (1 = most likely token under the model's
    distribution) and `.decoded_token` (the token's text, filled by the frontend when there is a tokenizer)."""

    __slots__ = ("rank", "decoded_token")

    def __new__(cls, logprob: float, rank: int | None = None, decoded_token: str | None = None) -> Logprob:
        self = super().__new__(cls, logprob)
        self.rank = rank
        self.decoded_token = decoded_token
        return self

    @property
    def logprob(self) -> float:
        return float(self)

    def __reduce__(self):
        return (Logprob, (float(self), self.rank, self.decoded_token))

    def __repr__(self) -> str:
        return f"Logprob(logprob={float(self)!r}, rank={self.rank!r}, decoded_token={self.decoded_token!r})"


# One position's logprobs: {token_id: Logprob}, the sampled (or prompt) token first, then the top-N by rank.
TokenLogprobs = dict[int, Logprob]


@dataclass
class NewRequestData:
    """A request the worker has not seen yet, sent once in full.

    `block_ids` are the KV blocks the request owns; `num_computed_tokens` tokens already sit in them
    (prefix-cache hits), so the worker computes from there.
    """

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    lora_request: Any = None  # weavelm.LoRARequest or None
    mm_features: list | None = None  # the request's weavelm.core.multimodal.MultiModalFeature items (None: text)


@dataclass
class CachedRequestsData:
    """Deltas for requests the worker already holds, parallel lists indexed alike.

    `new_block_ids[i]` are blocks appended since the last step; when `resumed_from_preemption[i]` is true they
    replace the request's block table instead (its blocks were freed when it was preempted).
    """

    req_ids: list[str] = field(default_factory=list)
    resumed_from_preemption: list[bool] = field(default_factory=list)
    new_block_ids: list[list[int]] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)


@dataclass
class SchedulerOutput:
    """What to run this step. `num_scheduled_tokens[req_id]` new tokens per scheduled request.

    `preempted_req_ids` left the running batch this step (their state stays with the worker until they resume or
    finish); `finished_req_ids` finished since the last step and can be dropped by the worker.
    `scheduled_spec_decode_tokens[req_id]`: the draft tokens a decode verifies this step (speculative decoding);
    such a request's `num_scheduled_tokens` is 1 + len(drafts): its last token, then the drafts.
    `scheduled_encoder_inputs[req_id]`: indices into the request's `mm_features` whose encoder runs this step
    (before the forward); the runner keeps each output until `free_encoder_input_ids` names `(req_id, index)` (or
    the request finishes), since later chunks of the placeholder run read it too.
    """

    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: CachedRequestsData
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: set[str] = field(default_factory=set)
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)
    scheduled_encoder_inputs: dict[str, list[int]] = field(default_factory=dict)
    num_common_prefix_blocks: int = 0
    free_encoder_input_ids: list[tuple[str, int]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class ModelRunnerOutput:
    """What one step produced. `sampled_token_ids[i]` is empty for a request whose prompt chunk did not finish
    the prompt. `logprobs[i]` parallels it (one TokenLogprobs per sampled token: the sampled token and the top-N
    of the unmodified distribution) or is None when not requested. `prompt_logprobs[req_id]` is sent once, on the
    step that finishes the prompt, for requests with `prompt_logprobs` set: one entry per prompt token, the first
    None.

    With speculative decoding `sampled_token_ids[i]` holds every token the step emitted for the request: its
    accepted drafts followed by the target's own token (so 1 to k + 1 tokens; the scheduler still cuts the run at a
    stop token or max_tokens). `spec_token_ids[i]` are the drafts proposed for the request's next step (None: no
    proposer); `proposer_time_s` is the wall time the proposer took this step."""

    req_ids: list[str]
    req_id_to_index: dict[str, int]
    sampled_token_ids: list[list[int]]
    logprobs: list[list[TokenLogprobs] | None] | None = None
    prompt_logprobs: dict[str, list[TokenLogprobs | None]] = field(default_factory=dict)
    spec_token_ids: list[list[int]] | None = None
    proposer_time_s: float = 0.0
    # pooling runner (`runner: pooling`): {req_id: pooled embedding} for the requests whose prompt finished this
    # step (their sampled_token_ids are empty: a pooling request samples nothing and finishes after its prompt)
    pooler_output: dict[str, list[float]] | None = None


class RunnerFuture:
    """A step whose device work may still be running. `result()` waits for it and returns its output; call it
    exactly once, before the next step is prepared. The base class wraps an output that is already complete."""

    def __init__(self, output: ModelRunnerOutput | None = None):
        self._output = output

    def result(self) -> ModelRunnerOutput:
        assert self._output is not None
        return self._output


@dataclass
class EngineCoreOutput:
    """Per-request delta from one core step, for the frontend."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # once, with the request's first token
    pooling_output: list[float] | None = None  # a pooling request's embedding, with its final (only) output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SchedulerStats:
    """Per-step stats, passed to the `weavelm_step_finished` hook."""

    num_running: int = 0
    num_waiting: int = 0
    num_preempted: int = 0  # preemptions during this step
    kv_usage: float = 0.0  # fraction of KV blocks in use
    prefix_hit_rate: float = 0.0  # cumulative share of queried prompt tokens found in the prefix cache
    num_cached_blocks: int = 0
    num_scheduled_tokens: int = 0
    step: int = 0
    num_used_blocks: int = 0  # KV blocks held by unfinished requests
    num_total_blocks: int = 0  # size of the KV pool
    num_active_loras: int = 0  # distinct LoRA adapters among running requests
    # output tokens of running requests still being sampled on the device: > 0 when the next step was scheduled
    # before this one's output arrived (async scheduling), always 0 for a synchronous engine
    num_output_placeholders: int = 0
    # speculative decoding, cumulative since start (zero without a proposer)
    spec_num_draft_tokens: int = 0  # drafts verified
    spec_num_accepted_tokens: int = 0  # drafts accepted
    spec_acceptance_rate: float = 0.0  # accepted / verified drafts
    spec_mean_accepted_length: float = 0.0  # tokens emitted per verifying request-step (accepted + 1)
    spec_proposer_time_s: float = 0.0  # wall time spent proposing


@dataclass
class CompletionOutput:
    """One completion of a request (`index` in [0, n)). `logprobs` (when asked for) holds one dict per token:
    {token_id: Logprob} with the chosen token and the `logprobs=N` most likely ones (vLLM's SampleLogprobs);
    `cumulative_logprob` is then the sum of the chosen tokens' logprobs (None without logprobs, as vLLM)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    """The user-facing result (vLLM's shape). Streaming yields it repeatedly with growing outputs."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # with `prompt_logprobs`: None, then one per token
    pooling_output: list[float] | None = None  # `runner: pooling`: the prompt's embedding (see `LLM.embed`)
