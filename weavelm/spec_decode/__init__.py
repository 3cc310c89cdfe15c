"""Speculative decoding: the helpers the scheduler (`scheduling.py`) and the model runner (`runner.py`) call from a
few hook points. The proposer contract is the `proposer` kind's (`weavelm.core.proposer`, exported by
`weavelm.plugin`); the rejection sampler is shared sampling code (`weavelm.sample.rejection`).

Flow of one request: after a step samples its next token, the runner asks the configured proposer for up to k draft
tokens and returns them in `ModelRunnerOutput.spec_token_ids`. The next `schedule()` grants the request 1 + k'
tokens (its last token plus k' <= k drafts, listed in `SchedulerOutput.scheduled_spec_decode_tokens`). The runner
runs all of them in one forward, verifies the drafts against the target's distributions (greedy: argmax equality;
sampling: the Leviathan et al. rule) and returns the accepted drafts plus one token sampled by the target. The
scheduler rolls `num_computed_tokens` back past the rejected drafts and returns the blocks that then hold no
known token to the pool; the runner drops the same blocks from its table (one rule, `kept_blocks`).
"""
