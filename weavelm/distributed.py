"""The parallel process groups: who this rank is and the collectives the model layers need.

A worker of a multi-rank executor joins torch.distributed once in `init_device` (before building the model), and
hands its groups to the runner through `RunnerContext.tp` (and, for pipeline, data and expert parallelism,
`RunnerContext.parallel`, a `ParallelContext`). The model's parallel layers (`weavelm.layers`) shard their weights by
a group's rank and call its collectives.

A group is a small picklable value: `rank` and `world_size` inside the group, and `ranks`, the global ranks it spans
in group order (None: the whole default (WORLD) group, ranks 0..world_size-1, as with tensor parallelism alone). Its
torch process group is created once per process by `init_parallel` (every rank creates every group, in the same
order, as torch requires) and looked up by `ranks`. A single-rank group never touches torch.distributed: every
collective is a no-op and no process group is needed.

`ParallelLayout` fixes how global ranks map to (data, pipeline, tensor) coordinates:
`global = dp_rank * (pp * tp) + pp_rank * tp + tp_rank` (vLLM's order: tensor-parallel ranks are adjacent, so they
share a node). The expert-parallel group of a pipeline stage spans every data- and tensor-parallel rank of it.

Shared by plugins; imports none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# The torch process groups of this process, by their global ranks (filled by `init_parallel`; a process joins one
# torch.distributed world, so one table per process is the state torch itself keeps).
_PROCESS_GROUPS: dict[tuple[int, ...], Any] = {}


@dataclass(frozen=True)
class TensorParallelGroup:
    """This rank's place among `world_size` tensor-parallel ranks (picklable; crosses into worker processes)."""

    rank: int = 0
    world_size: int = 1
    ranks: tuple[int, ...] | None = None  # global ranks in group order; None: WORLD (0..world_size-1)

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"tensor-parallel rank {self.rank} is not in 0..{self.world_size - 1}")
        if self.ranks is not None and len(self.ranks) != self.world_size:
            raise ValueError(f"group ranks {self.ranks} do not number world_size {self.world_size}")

    @property
    def process_group(self) -> Any:
        """The torch process group of `ranks` (None: the default group). KeyError when `init_parallel` did not
        create it in this process."""
        if self.ranks is None or self.world_size == 1:
            return None
        try:
            return _PROCESS_GROUPS[self.ranks]
        except KeyError:
            raise KeyError(f"no process group for ranks {self.ranks} in this process; init_parallel creates it")\
                from None

    def global_rank(self, group_rank: int) -> int:
        """The global rank of the group's `group_rank`."""
        return group_rank if self.ranks is None else self.ranks[group_rank]

    @property
    def is_first(self) -> bool:
        """Rank 0: the rank whose outputs the executor returns."""
        return self.rank == 0

    def divide(self, size: int, what: str = "size") -> int:
        """`size // world_size`; ValueError naming `what` when it does not divide evenly."""
        if size % self.world_size:
            raise ValueError(f"{what} ({size}) is not divisible by the tensor-parallel size ({self.world_size})")
        return size // self.world_size

    def shard_range(self, size: int, what: str = "size") -> tuple[int, int]:
        """`(start, end)` of this rank's equal share of `size` (which must divide evenly)."""
        per_rank = self.divide(size, what)
        return self.rank * per_rank, (self.rank + 1) * per_rank

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place; returns `t`. A no-op on one rank."""
        if self.world_size == 1:
            return t
        import torch.distributed as dist

        dist.all_reduce(t, group=self.process_group)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' `t` (same shape on every rank) concatenated along `dim` in rank order. `t` itself on one rank."""
        if self.world_size == 1:
            return t
        import torch
        import torch.distributed as dist

        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t, group=self.process_group)
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Sum `t` over the ranks and return this rank's equal slice of the sum along `dim` (which must divide by
        world_size). `t` itself on one rank. (gloo has no reduce_scatter: all-reduce, then slice.)"""
        if self.world_size == 1:
            return t
        import torch.distributed as dist

        t = t.contiguous()
        size = self.divide(t.shape[dim], "reduce-scatter dimension")
        if dist.get_backend(self.process_group) == "gloo" or dim != 0:
            dist.all_reduce(t, group=self.process_group)
            return t.narrow(dim, self.rank * size, size).contiguous()
        out = t.new_empty((size,) + tuple(t.shape[1:]))
        dist.reduce_scatter_tensor(out, t, group=self.process_group)
        return out

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """`t` of group rank `src` on every rank (in place); returns `t`."""
        if self.world_size == 1:
            return t
        import torch.distributed as dist

        dist.broadcast(t, src=self.global_rank(src), group=self.process_group)
        return t

    def send(self, t: torch.Tensor, dst: int) -> None:
        """Send `t` to group rank `dst` (point to point, for pipeline stages)."""
        import torch.distributed as dist

        dist.send(t.contiguous(), dst=self.global_rank(dst), group=self.process_group)

    def isend(self, t: torch.Tensor, dst: int) -> Any:
        """Start sending the contiguous `t` to group rank `dst` and return the torch work handle (keep `t` alive and
        `wait()` the handle before reusing it): a pipeline stage goes on to its next micro-batch while data travels."""
        import torch.distributed as dist

        if not t.is_contiguous():
            raise ValueError("isend needs a contiguous tensor (the caller keeps it alive until the send completes)")
        return dist.isend(t, dst=self.global_rank(dst), group=self.process_group)

    def recv(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into `t` from group rank `src`; returns `t`."""
        import torch.distributed as dist

        dist.recv(t, src=self.global_rank(src), group=self.process_group)
        return t

    def barrier(self) -> None:
        """Wait for every rank of the group."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self.process_group)


@dataclass(frozen=True)
class ParallelLayout:
    """How many ranks each strategy spans: `tensor` x `pipeline` ranks per engine-core replica, `data` replicas;
    `expert`: MoE layers spread their experts over the expert-parallel group (every data- and tensor-parallel rank of
    a pipeline stage) instead of sharding each expert. `world_size` counts every rank of every replica."""

    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    expert: bool = False

    def __post_init__(self) -> None:
        for name in ("tensor", "pipeline", "data"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}-parallel size must be at least 1, got {getattr(self, name)}")

    @property
    def world_size(self) -> int:
        return self.data * self.pipeline * self.tensor

    def global_rank(self, dp: int, pp: int, tp: int) -> int:
        return (dp * self.pipeline + pp) * self.tensor + tp

    @property
    def output_rank(self) -> int:
        """The rank whose step output an executor returns: tensor rank 0 of the last pipeline stage (of replica 0)."""
        return self.global_rank(0, self.pipeline - 1, 0)

    def where(self, global_rank: int) -> str:
        """`global_rank`'s place for messages: "" without pipeline or data parallelism, else e.g. " of pipeline
        stage 1"."""
        dp, pp, _ = self.coords(global_rank)
        parts = ([f"data-parallel replica {dp}"] if self.data > 1 else []) + \
            ([f"pipeline stage {pp}"] if self.pipeline > 1 else [])
        return " of " + ", ".join(parts) if parts else ""

    def coords(self, global_rank: int) -> tuple[int, int, int]:
        """(dp_rank, pp_rank, tp_rank) of `global_rank`."""
        dp, rest = divmod(global_rank, self.pipeline * self.tensor)
        pp, tp = divmod(rest, self.tensor)
        return dp, pp, tp

    def all_groups(self) -> list[tuple[int, ...]]:
        """Every multi-rank group of the layout (tensor, pipeline, data, then expert groups), in the one order every
        rank creates them."""
        t, p, d = self.tensor, self.pipeline, self.data
        groups = [tuple(self.global_rank(i, j, k) for k in range(t)) for i in range(d) for j in range(p)]
        groups += [tuple(self.global_rank(i, j, k) for j in range(p)) for i in range(d) for k in range(t)]
        groups += [tuple(self.global_rank(i, j, k) for i in range(d)) for j in range(p) for k in range(t)]
        if self.expert:
            groups += [tuple(self.global_rank(i, j, k) for i in range(d) for k in range(t)) for j in range(p)]
        seen: list[tuple[int, ...]] = []
        for g in groups:
            if len(g) > 1 and g not in seen:
                seen.append(g)
        return seen


def layout_from_options(options: Any, world_size: int) -> ParallelLayout:
    """The layout an executor's options describe (`tensor_parallel_size`, `pipeline_parallel_size`,
    `enable_expert_parallel`, each optional; an executor without them runs `world_size` tensor-parallel ranks); the
    ranks left over (`world_size / (tensor * pipeline)`) are data-parallel replicas."""
    tensor = int(getattr(options, "tensor_parallel_size", None) or world_size)
    pipeline = int(getattr(options, "pipeline_parallel_size", None) or 1)
    data = max(1, world_size // (tensor * pipeline))
    return ParallelLayout(tensor, pipeline, data, bool(getattr(options, "enable_expert_parallel", False)))


@dataclass(frozen=True)
class ParallelContext:
    """One rank's groups (picklable). `tp`: its tensor-parallel group; `pp`: the pipeline stages it belongs to
    (group rank = stage index); `dp`: the same (pp, tp) position in every data-parallel replica; `ep`: the
    expert-parallel group (one rank, no experts spread, unless the layout's `expert`)."""

    layout: ParallelLayout = field(default_factory=ParallelLayout)
    tp: TensorParallelGroup = field(default_factory=TensorParallelGroup)
    pp: TensorParallelGroup = field(default_factory=TensorParallelGroup)
    dp: TensorParallelGroup = field(default_factory=TensorParallelGroup)
    ep: TensorParallelGroup = field(default_factory=TensorParallelGroup)

    @classmethod
    def for_rank(cls, layout: ParallelLayout, global_rank: int) -> ParallelContext:
        """The groups of `global_rank` in `layout` (no process group is created; see `init_parallel`). A group
        spanning the whole world is the default group (`ranks=None`)."""
        dp, pp, tp = layout.coords(global_rank)
        t, p, d = layout.tensor, layout.pipeline, layout.data

        def group(ranks: tuple[int, ...], me: int) -> TensorParallelGroup:
            whole = ranks == tuple(range(layout.world_size))
            return TensorParallelGroup(me, len(ranks), None if whole or len(ranks) == 1 else ranks)

        ep = TensorParallelGroup()
        if layout.expert:
            ep = group(tuple(layout.global_rank(i, pp, k) for i in range(d) for k in range(t)), dp * t + tp)
        return cls(layout,
                   tp=group(tuple(layout.global_rank(dp, pp, k) for k in range(t)), tp),
                   pp=group(tuple(layout.global_rank(dp, j, tp) for j in range(p)), pp),
                   dp=group(tuple(layout.global_rank(i, pp, tp) for i in range(d)), dp),
                   ep=ep)


def init_parallel(layout: ParallelLayout, global_rank: int, init_method: str | None,
                  backend: str | None = None) -> ParallelContext:
    """Join the default process group as `global_rank` of `layout.world_size` and create every group of the layout
    (all ranks call this, with the same layout); returns this rank's `ParallelContext`. With one rank it
    initialises nothing."""
    ctx = ParallelContext.for_rank(layout, global_rank)
    if layout.world_size == 1:
        return ctx
    import torch.distributed as dist

    init_distributed(global_rank, layout.world_size, init_method, backend)
    for ranks in layout.all_groups():
        if ranks not in _PROCESS_GROUPS and ranks != tuple(range(layout.world_size)):
            _PROCESS_GROUPS[ranks] = dist.new_group(list(ranks))
    return ctx


def check_pipeline_config(config: Any, pipeline_parallel_size: int) -> None:
    """ConfigError for what pipeline parallelism does not combine with (the multi-rank executors call it with the
    engine config): speculative decoding (its proposer runs beside the whole model)."""
    if pipeline_parallel_size > 1 and getattr(config, "speculative", None) is not None:
        from weavelm.errors import ConfigError

        raise ConfigError([("executor.pipeline_parallel_size", "speculative decoding needs the whole model on one "
                                                               "rank; use pipeline_parallel_size 1 with `speculative:`")])


def default_backend(device_type: str) -> str:
    """"nccl" for CUDA devices, "gloo" otherwise."""
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(rank: int, world_size: int, init_method: str, backend: str | None = None) -> TensorParallelGroup:
    """Join the default process group as `rank` of `world_size` (e.g. `init_method="tcp://127.0.0.1:29500"`) and
    return this rank's group. `backend` defaults to "nccl" when CUDA is available, else "gloo"; a CUDA worker sets
    its device before calling. Called once per worker process, before the model is built; with world_size 1 it
    initialises nothing. Calling it again with the same rank and size returns the group."""
    group = TensorParallelGroup(rank, world_size)
    if world_size == 1:
        return group
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise RuntimeError(f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                               f"{dist.get_world_size()}, not {rank} of {world_size}")
        return group
    backend = backend or default_backend("cuda" if torch.cuda.is_available() else "cpu")
    dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size)
    return group


def destroy_distributed() -> None:
    """Leave the default process group (at worker shutdown); nothing when none was joined."""
    import torch.distributed as dist

    _PROCESS_GROUPS.clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
