"""Where a data-parallel replica's ranks sit when the replicas share one torch.distributed world: DP attention +
EP MoE (`data_parallel_size > 1` with `enable_expert_parallel`), where every replica's MoE layers dispatch tokens
over an expert-parallel group spanning the replicas. Executors ask `replica_world` for their layout, their first
global rank and the init method; without that combination each replica is a world of its own."""

from __future__ import annotations

from typing import Any

from weavelm.distributed import ParallelLayout


def shares_experts(config: Any) -> bool:
    """Whether the replicas of `config` form one world (several replicas, expert parallelism on)."""
    return config.data_parallel_size > 1 and bool(getattr(config.executor.options, "enable_expert_parallel", False))


def replica_world(config: Any, layout: ParallelLayout) -> tuple[ParallelLayout, int, str | None]:
    """`(layout, first_rank, init_method)` for an executor whose own ranks form `layout`: the joint layout
    (`data = data_parallel_size`, global rank = `data_parallel_rank * layout.world_size + local rank`) and the
    replicas' rendezvous when the data-parallel client set one (`config.data_parallel_master`), else `layout`
    itself, 0 and None (the executor picks its own init method)."""
    if not (shares_experts(config) and config.data_parallel_master):
        return layout, 0, None
    joint = ParallelLayout(layout.tensor, layout.pipeline, config.data_parallel_size, True)
    return joint, config.data_parallel_rank * layout.world_size, config.data_parallel_master
