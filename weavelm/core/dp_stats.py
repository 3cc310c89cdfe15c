"""Stats of a data-parallel engine: each replica's (`ReplicaStats`) and their sum (`DataParallelStats`), which
`LLM.get_stats()`, `AsyncLLM.get_stats()` and `/metrics` show (`EngineStats.replicas` keeps the per-replica rows)."""

from __future__ import annotations

from dataclasses import dataclass

from weavelm.core.outputs import SchedulerStats

# summed over the replicas; the other SchedulerStats fields are combined as `aggregate` says
_SUMMED = ("num_running", "num_waiting", "num_preempted", "num_cached_blocks", "num_scheduled_tokens",
           "num_used_blocks", "num_total_blocks", "num_output_placeholders", "spec_num_draft_tokens",
           "spec_num_accepted_tokens", "spec_proposer_time_s")


@dataclass(frozen=True)
class ReplicaStats:
    """One replica's row of `EngineStats.replicas`. `num_requests`: requests the client routed to it since start;
    `num_preemptions`: its preemptions since start (as of its last step). A dead replica keeps its totals, with
    `alive` False and zero load."""

    index: int
    alive: bool
    pid: int | None
    num_requests: int
    num_preemptions: int
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    num_used_blocks: int = 0
    num_total_blocks: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0


@dataclass
class DataParallelStats(SchedulerStats):
    """The replicas' SchedulerStats combined (what `DPClient.get_stats` returns), with each replica's row."""

    replicas: tuple[ReplicaStats, ...] = ()


def aggregate(per_replica: list[SchedulerStats | None], rows: tuple[ReplicaStats, ...]) -> DataParallelStats:
    """Counts are summed over the live replicas (None: a dead one); KV usage is used / total blocks; the prefix
    hit rate and `step` are the replicas' mean and maximum; `num_active_loras` the maximum (adapters may be
    shared); the acceptance rate is recomputed from the summed counts, the mean accepted length weighted by drafts."""
    live = [s for s in per_replica if s is not None]
    out = DataParallelStats(replicas=rows)
    for name in _SUMMED:
        setattr(out, name, sum(getattr(s, name) for s in live))
    if live:
        out.step = max(s.step for s in live)
        out.num_active_loras = max(s.num_active_loras for s in live)
        out.prefix_hit_rate = sum(s.prefix_hit_rate for s in live) / len(live)
    if out.num_total_blocks:
        out.kv_usage = out.num_used_blocks / out.num_total_blocks
    if out.spec_num_draft_tokens:
        out.spec_acceptance_rate = out.spec_num_accepted_tokens / out.spec_num_draft_tokens
        out.spec_mean_accepted_length = sum(s.spec_mean_accepted_length * s.spec_num_draft_tokens
                                            for s in live) / out.spec_num_draft_tokens
    return out
