"""Helpers for parity tests: logits of the engine's model on a prompt, outside the scheduler."""

from __future__ import annotations

import torch

from weavelm.core.outputs import CachedRequestsData, NewRequestData, SchedulerOutput
from weavelm.core.request import SamplingParams


def _runner(llm):
    llm.engine.client.drain()  # no launched step may be in flight while the core is driven directly
    core = llm.engine.client.core
    return core.executor.worker.runner, core


@torch.inference_mode()
def prompt_logits(llm, token_ids: list[int], all_positions: bool = False) -> torch.Tensor:
    """Logits (float32, CPU) for the prompt's last position (or every position) from a one-off forward through
    the engine's runner, KV cache and attention backend. Uses blocks at the end of the pool; the engine must
    be idle."""
    runner, core = _runner(llm)
    bs = runner.block_size
    nblocks = -(-len(token_ids) // bs)
    blocks = list(range(core.num_blocks - nblocks, core.num_blocks))
    rid = "__logits__"
    so = SchedulerOutput([NewRequestData(rid, list(token_ids), SamplingParams(temperature=0.0), blocks, 0)],
                         CachedRequestsData(), {rid: len(token_ids)}, len(token_ids))
    runner._update_states(so)
    try:
        input_ids, positions, common, _, _ = runner._prepare_inputs(so)
        from weavelm.core.forward import ForwardBatch

        fb = ForwardBatch(runner.attn_builder.build(common), runner.kv_caches, runner.attn_impls)
        hidden = runner.run_model(input_ids, positions, fb)
        hidden = hidden[: len(token_ids)] if all_positions else hidden[len(token_ids) - 1]
        return runner.bundle.model.compute_logits(hidden).float().cpu()
    finally:
        runner._update_states(SchedulerOutput([], CachedRequestsData(), {}, 0, finished_req_ids={rid}))


@torch.inference_mode()
def teacher_forced_logits(llm, prompts: list[list[int]], continuations: list[list[int]]) -> list[torch.Tensor]:
    """Run the prompts together through the real engine loop (scheduler, runner, CUDA graphs if captured), forcing
    each request's next token to its continuation, and return per request the logits (steps, vocab) of every
    step: position len(prompt)-1 onward, one row per continuation token."""
    runner, core = _runner(llm)
    engine = llm.engine
    forced = {}
    rows: dict[str, list[torch.Tensor]] = {}

    def observe(req_ids, logits):
        for i, rid in enumerate(req_ids):
            rows.setdefault(rid, []).append(logits[i].float().cpu())

    runner.logits_observer = observe
    try:
        for i, (p, c) in enumerate(zip(prompts, continuations)):
            rid = f"tf-{i}"
            forced[rid] = list(c)
            engine.add_request({"prompt_token_ids": p}, SamplingParams(max_tokens=len(c), temperature=0.0,
                                                                       ignore_eos=True), request_id=rid)
        sched = core.scheduler
        while engine.has_unfinished_requests():
            so = sched.schedule()
            out = core.executor.execute_model(so)
            for rid, toks in zip(out.req_ids, out.sampled_token_ids):
                if toks:
                    step = len(rows[rid]) - 1
                    tok = forced[rid][step]
                    toks[0] = tok
                    row = runner.batch.index[rid]
                    runner.batch.token_ids[row, runner.batch.num_tokens[row] - 1] = tok
            for co in sched.update_from_output(so, out):
                engine._process(co)
    finally:
        runner.logits_observer = None
    return [torch.stack(rows[f"tf-{i}"]) for i in range(len(prompts))]
