"""Helpers for parity tests: logits of the engine's model on a prompt, outside the scheduler."""

from __future__ import annotations

import torch

from weavelm.core.outputs import CachedRequestsData, NewRequestData, SchedulerOutput
from weavelm.core.request import SamplingParams


def _runner(llm):
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
