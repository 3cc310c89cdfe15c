"""The scheduler's side of speculative decoding: which drafts a decode gets, the lookahead slots a KV-using
proposer writes into, the rollback after verification, and the acceptance counters."""

from __future__ import annotations

from weavelm.core.outputs import ModelRunnerOutput
from weavelm.core.request import Request
from weavelm.utils import cdiv


def kept_blocks(num_tokens: int, block_size: int) -> int:
    """Blocks a request keeps after a verified step: those holding its known tokens. The scheduler frees the rest
    of its table and the runner drops the same tail from its copy (the one rule both sides apply)."""
    return cdiv(num_tokens, block_size)


class SpecDecodeScheduling:
    """Per-scheduler state: the latest proposals (valid for the very next step only) and cumulative counters."""

    def __init__(self, num_speculative_tokens: int, num_lookahead_tokens: int, max_model_len: int):
        self.k = num_speculative_tokens
        self.lookahead = num_lookahead_tokens
        self.max_model_len = max_model_len
        self.proposals: dict[str, list[int]] = {}
        self.num_drafts = 0  # draft tokens scheduled for verification
        self.num_accepted = 0  # of those, accepted
        self.num_verify_steps = 0  # request-steps that verified at least one draft
        self.proposer_time_s = 0.0

    def drafts_for(self, request: Request, budget: int) -> list[int]:
        """The drafts to schedule with a decode of `request` (which has one unverified token), within the step's
        token `budget`, the context limit and its remaining `max_tokens` (the last emitted token is the
        target's own, so at most max_tokens - outputs - 1 drafts can be used)."""
        drafts = self.proposals.get(request.request_id)
        if not drafts:
            return []
        room = min(budget - 1, self.max_model_len - request.num_tokens,
                   request.sampling_params.max_tokens - request.num_output_tokens - 1)
        return drafts[:max(room, 0)]

    def lookahead_for(self, request: Request, num_computed: int, num_new: int) -> int:
        """Extra slots to reserve beyond `num_new` tokens for the proposer's own KV, when this step samples; bounded
        so the request never holds more than its longest possible sequence."""
        if not self.lookahead or num_computed + num_new < request.num_tokens:
            return 0
        longest = min(self.max_model_len, request.num_prompt_tokens + request.sampling_params.max_tokens)
        return max(0, min(self.lookahead, longest - num_computed - num_new))

    def rollback(self, request: Request, num_drafts: int, num_sampled: int) -> None:
        """After a verified step that emitted `num_sampled` tokens (accepted drafts + 1): un-compute the rejected
        drafts, whose KV slots the next step overwrites."""
        request.num_computed_tokens -= num_drafts + 1 - num_sampled
        self.num_drafts += num_drafts
        self.num_accepted += num_sampled - 1
        self.num_verify_steps += 1

    def take_proposals(self, runner_output: ModelRunnerOutput) -> None:
        self.proposer_time_s += runner_output.proposer_time_s
        spec = runner_output.spec_token_ids
        self.proposals = {} if not spec else {rid: spec[i] for rid, i in runner_output.req_id_to_index.items()
                                              if i < len(spec) and spec[i]}

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_drafts if self.num_drafts else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verifying request-step (accepted drafts + the target's own token)."""
        return 1.0 + self.num_accepted / self.num_verify_steps if self.num_verify_steps else 0.0
