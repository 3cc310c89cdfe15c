"""Expert parallelism for `FusedMoE` (vLLM's `enable_expert_parallel`): each rank of the expert-parallel group holds
`num_experts / ep_size` whole experts instead of a slice of every expert, and tokens meet their experts.

    ep = ExpertParallel.from_context(parallel)        # None unless the layout has `expert` and ep_size > 1
    moe = FusedMoE(hidden, inter, num_experts, top_k, renormalize, tp=tp, ep=ep)

Rank `r` of the group holds experts `[r * n, (r + 1) * n)`, `n = num_experts / ep_size` (uneven -> ConfigError).
Routing is over all experts on every rank (the router is replicated); a pair (token, expert) whose expert lives on
another rank is marked locally with the id `n` (one past the last local expert), which the expert kernels skip
(`moe_reference`, `moe_sorted`, `moe_kernels.fused_moe` all take that contract).

How the partial results meet, by what the ranks of the group hold:
- `tokens_replicated` (tensor parallelism alone: the expert group is the tensor-parallel group, every rank has the
  same tokens): each rank runs its experts on the pairs routed to them and one all-reduce sums the experts' outputs
  (the same single collective as without EP).
- different tokens per rank (data-parallel attention + EP MoE): a dispatch. `"all2all"`: each pair is sent to the
  rank holding its expert (`all_to_all_single` with the exchanged counts), run there, and sent back; `"allgather"`:
  every rank's tokens are all-gathered (padded to the largest count), each rank runs its experts on all of them and
  a reduce-scatter returns each rank its own tokens' sums. `DEFAULT_DISPATCH` is the measured choice
  (benchmarks/moe_ep_dispatch.py, benchmarks/RESULTS.md "expert-parallel dispatch").

Every rank of the group must call the layer in the same step (a rank with no tokens passes a (0, H) batch): the
dispatch is made of collectives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from weavelm.distributed import TensorParallelGroup
from weavelm.errors import ConfigError

if TYPE_CHECKING:
    from weavelm.distributed import ParallelContext

DISPATCHES = ("all2all", "allgather")
# measured on 2 gloo ranks (benchmarks/RESULTS.md "expert-parallel dispatch"): all-to-all moves only the routed
# pairs, all-gather + reduce-scatter every token of every rank twice; all2all wins from a few tokens up
DEFAULT_DISPATCH = "all2all"

# (x (P, H), weights (P, k), local ids (P, k)) -> (P, H): the local experts' weighted outputs (`FusedExperts`)
ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExpertParallel:
    """How one model's MoE layers spread their experts (picklable). `group`: the expert-parallel group, whose rank
    `r` holds the `r`-th equal run of experts. `tokens_replicated`: every rank of the group has the same tokens
    (EP over tensor-parallel ranks); else tokens are dispatched by `dispatch` ("all2all" or "allgather")."""

    group: TensorParallelGroup
    tokens_replicated: bool = True
    dispatch: str = DEFAULT_DISPATCH

    def __post_init__(self) -> None:
        if self.dispatch not in DISPATCHES:
            raise ValueError(f"expert dispatch {self.dispatch!r} is not one of {DISPATCHES}")

    @classmethod
    def from_context(cls, parallel: ParallelContext | None, dispatch: str = DEFAULT_DISPATCH
                     ) -> ExpertParallel | None:
        """The expert parallelism of a rank's groups: None without `layout.expert` or with a one-rank group.
        Tokens are replicated over the group when there is one data-parallel replica (the group is then the
        tensor-parallel group)."""
        if parallel is None or not parallel.layout.expert or parallel.ep.world_size == 1:
            return None
        return cls(parallel.ep, tokens_replicated=parallel.layout.data == 1, dispatch=dispatch)

    @property
    def size(self) -> int:
        return self.group.world_size

    def local_experts(self, num_experts: int) -> tuple[int, int]:
        """`(first, count)` of this rank's experts; ConfigError when `num_experts` does not divide evenly."""
        if num_experts % self.size:
            raise ConfigError([("executor.enable_expert_parallel",
                                f"the model's {num_experts} experts do not divide evenly over {self.size} "
                                f"expert-parallel ranks (tensor x data parallel size); choose sizes whose product "
                                f"divides {num_experts}, or turn enable_expert_parallel off")])
        n = num_experts // self.size
        return self.group.rank * n, n

    def combine(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int,
                experts: ExpertsFn) -> torch.Tensor:
        """The routed experts' output (T, H) of this rank's tokens x (T, H), routed to global expert `ids` with
        `weights` (T, k), where `experts` runs this rank's experts on local ids (remote pairs marked `n`)."""
        first, n = self.local_experts(num_experts)
        if self.tokens_replicated:
            return self.group.all_reduce(experts(x, weights, to_local(ids, first, n)))
        if self.dispatch == "allgather":
            return _allgather_combine(self.group, x, weights, ids, first, n, experts)
        return _all2all_combine(self.group, x, weights, ids, n, experts)


def to_local(ids: torch.Tensor, first: int, n: int) -> torch.Tensor:
    """Global expert ids -> this rank's (`first` .. `first + n - 1` -> 0 .. n-1); any other expert -> `n`."""
    local = ids - first
    return torch.where((local >= 0) & (local < n), local, torch.full_like(local, n))


def _allgather_combine(group: TensorParallelGroup, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                       first: int, n: int, experts: ExpertsFn) -> torch.Tensor:
    t = x.shape[0]
    counts = group.all_gather(torch.tensor([t], dtype=torch.int64, device=x.device), dim=0)
    most = int(counts.max())
    if most == 0:
        return torch.zeros_like(x)
    pad = most - t
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad))
    wp = torch.nn.functional.pad(weights, (0, 0, 0, pad))
    ip = torch.nn.functional.pad(ids, (0, 0, 0, pad), value=-1)  # padding rows route nowhere (-1 -> remote)
    gx, gw, gi = (group.all_gather(v, dim=0) for v in (xp, wp, ip))
    out = experts(gx, gw, to_local(gi, first, n))  # (size * most, H): partial sums of every rank's tokens
    return group.reduce_scatter(out, dim=0)[:t]


def _all_to_all(group: TensorParallelGroup, t: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
    import torch.distributed as dist

    out = t.new_empty((sum(recv),) + tuple(t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), output_split_sizes=recv, input_split_sizes=send,
                           group=group.process_group)
    return out


def _all2all_combine(group: TensorParallelGroup, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                     n: int, experts: ExpertsFn) -> torch.Tensor:
    k = ids.shape[1]
    flat = ids.reshape(-1)
    dest = flat // n
    order = torch.argsort(dest, stable=True)
    send_t = torch.bincount(dest, minlength=group.world_size)
    recv_t = _all_to_all(group, send_t, [1] * group.world_size, [1] * group.world_size)
    send, recv = send_t.tolist(), recv_t.tolist()
    token = order // k
    # one exchange for the rows, one for (weight, local id) as fp32 (ids below 2**24 are exact)
    meta = torch.stack([weights.reshape(-1)[order].to(torch.float32), (flat[order] - dest[order] * n).float()], 1)
    rx = _all_to_all(group, x[token], send, recv)
    rmeta = _all_to_all(group, meta, send, recv)
    ry = experts(rx, rmeta[:, :1], rmeta[:, 1:].long())
    back = _all_to_all(group, ry, recv, send)  # each pair's weighted output, in `order`
    return torch.zeros_like(x).index_add_(0, token, back.to(x.dtype))
