"""Tensor parallelism's process group: who this rank is and the two collectives the model layers need.

A worker of a multi-rank executor calls `init_distributed` once in `init_device` (before building the model), then
hands `TensorParallelGroup(rank, world_size)` to its runner through `RunnerContext.tp`. The model's parallel layers
(`weavelm.layers`) shard their weights by the group's rank and call `all_reduce` / `all_gather`
on torch.distributed's default (WORLD) process group. A single-rank group (the default) never touches
torch.distributed: every collective is a no-op and no process group is needed.

Shared by plugins; imports none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorParallelGroup:
    """This rank's place among `world_size` tensor-parallel ranks (picklable; crosses into worker processes)."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"tensor-parallel rank {self.rank} is not in 0..{self.world_size - 1}")

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

        dist.all_reduce(t)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' `t` (same shape on every rank) concatenated along `dim` in rank order. `t` itself on one rank."""
        if self.world_size == 1:
            return t
        import torch
        import torch.distributed as dist

        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t)
        return torch.cat(parts, dim=dim)


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

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
