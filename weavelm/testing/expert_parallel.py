"""Checking expert-parallel MoE layers on several ranks (gloo or NCCL), run inside an engine's workers, which have
joined torch.distributed already.

    check = functools.partial(rank_dispatch_errors, tokens=(5, 0))
    errors = llm.collective_rpc("apply_model", (check,))   # per rank: {path: max |diff|}

Each rank builds the same seeded `FusedMoE` whole and spread over the ranks (`ExpertParallel`), runs its own tokens
(`tokens[rank]` rows; a rank may hold none) through every combine path, and reports the largest difference from the
whole layer on its tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from weavelm.distributed import TensorParallelGroup
from weavelm.layers.expert_parallel import ExpertParallel
from weavelm.layers.fused_moe import FusedMoE

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 16, 8, 4, 2


def seeded_moe(tp: TensorParallelGroup = TensorParallelGroup(), ep: ExpertParallel | None = None,
               hidden: int = HIDDEN, intermediate: int = INTERMEDIATE, experts: int = EXPERTS,
               top_k: int = TOP_K) -> FusedMoE:
    """The same random layer on every rank: whole without `ep`, else this rank's experts of it."""
    torch.manual_seed(3)
    whole = FusedMoE(hidden, intermediate, experts, top_k, True)
    for p in whole.parameters():
        p.data.normal_()
    if ep is None:
        return whole
    moe = FusedMoE(hidden, intermediate, experts, top_k, True, tp=tp, ep=ep)
    moe.gate.weight.data.copy_(whole.gate.weight)
    moe.experts.weight_loader(moe.experts.w13_weight, whole.experts.w13_weight.data, None)
    moe.experts.weight_loader(moe.experts.w2_weight, whole.experts.w2_weight.data, None)
    return moe


def rank_dispatch_errors(model: Any = None, tokens: tuple[int, ...] = (5, 0)) -> dict[str, float]:
    """On every rank of an initialised torch.distributed world of `len(tokens)` ranks (e.g. inside an engine's
    workers: `llm.collective_rpc("apply_model", (functools.partial(rank_dispatch_errors, tokens=(5, 0)),))`;
    `model` is ignored): this rank's {path: max abs difference from the whole layer}."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    if world != len(tokens):
        raise ValueError(f"{len(tokens)} token counts for {world} ranks")
    group = TensorParallelGroup(rank, world)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    g = torch.Generator().manual_seed(10)
    xs = [torch.randn(t, HIDDEN, generator=g).to(device) for t in tokens]
    out: dict[str, float] = {}
    with torch.no_grad(), torch.device(device):
        whole = seeded_moe()
        same = seeded_moe(group, ExpertParallel(group, tokens_replicated=True))(xs[0])
        out["replicated"] = (same - whole(xs[0])).abs().max().item()
        for dispatch in ("all2all", "allgather"):
            got = seeded_moe(group, ExpertParallel(group, tokens_replicated=False, dispatch=dispatch))(xs[rank])
            if got.shape != xs[rank].shape:
                raise AssertionError(f"{dispatch}: output {tuple(got.shape)} for input {tuple(xs[rank].shape)}")
            out[dispatch] = (got - whole(xs[rank])).abs().max().item() if tokens[rank] else 0.0
    return out
