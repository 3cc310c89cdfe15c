"""Parity helpers: logits of a real `LLM` for given tokens, through the public engine loop only.

Both run the requests through the engine's scheduler, runner, KV cache, attention backend (and CUDA graphs when
captured), observing and forcing tokens with `ModelRunner.set_logits_hook`, reached through
`LLM.collective_rpc`. The engine must be idle (no other requests in flight) and in-process.
"""

from __future__ import annotations

import itertools

import torch

from weavelm.core.request import SamplingParams

_ids = itertools.count()


def teacher_forced_logits(llm, prompts: list[list[int]], continuations: list[list[int]]) -> list[torch.Tensor]:
    """Run the prompts together, forcing each request's sampled tokens to its continuation, and return per request
    the float32 CPU logits (len(continuation), vocab) of every step: position len(prompt)-1 onward."""
    run = next(_ids)
    forced = {f"tf-{run}-{i}": list(c) for i, c in enumerate(continuations)}
    rows: dict[str, list[torch.Tensor]] = {rid: [] for rid in forced}

    def force(req_ids: list[str], logits: torch.Tensor) -> torch.Tensor:
        replaced = logits.clone()
        for i, rid in enumerate(req_ids):
            if rid not in forced:
                continue
            rows[rid].append(logits[i].float().cpu())
            replaced[i] = float("-inf")
            replaced[i, forced[rid][len(rows[rid]) - 1]] = 0.0
        return replaced

    engine = llm.engine
    llm.collective_rpc("set_logits_hook", (force,))
    try:
        for (rid, cont), prompt in zip(forced.items(), prompts):
            engine.add_request({"prompt_token_ids": list(prompt)},
                               SamplingParams(max_tokens=len(cont), temperature=0.0, ignore_eos=True),
                               request_id=rid)
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        llm.collective_rpc("set_logits_hook", (None,))
    return [torch.stack(rows[rid]) for rid in forced]


def prompt_logits(llm, token_ids: list[int], all_positions: bool = False) -> torch.Tensor:
    """Float32 CPU logits of the prompt's last position (vocab,), or of every position (len, vocab) with
    `all_positions` (computed by teacher-forcing the prompt one token at a time after its first)."""
    if all_positions:
        return teacher_forced_logits(llm, [token_ids[:1]], [list(token_ids[1:]) + [0]])[0]
    return teacher_forced_logits(llm, [token_ids], [[0]])[0][0]
