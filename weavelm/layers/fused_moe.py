"""Mixture-of-experts feed-forward (vLLM's `FusedMoE`): router, top-k, experts in stacked tensors, optional shared
expert.

    moe = FusedMoE(hidden, moe_intermediate, num_experts, top_k, renormalize=True, tp=tp)        # Mixtral / Qwen3-MoE
    moe = FusedMoE(hidden, 1408, 60, 4, renormalize=False, shared_intermediate=5632, tp=tp)      # Qwen2-MoE

Per token: `router_logits = gate(x)` (a replicated `[E, H]` linear), softmax in fp32, the `top_k` largest
probabilities, divided by their sum when `renormalize` (the checkpoint's `norm_topk_prob`; Mixtral always does).
Each chosen expert computes `down(silu(gate(x)) * up(x))`, weighted by its probability and summed. A shared expert
(Qwen2-MoE) adds `sigmoid(shared_expert_gate(x)) * shared_expert(x)` for every token.

Weights: `experts.w13_weight` is `[E, 2 * I / tp, H]` (each expert's `[gate_r | up_r]`, the layout of
`MergedColumnParallelLinear`) and `experts.w2_weight` `[E, H, I / tp]`: each expert's intermediate dimension is split
over the tensor-parallel ranks (column-parallel w13, row-parallel w2) and the partial outputs are summed with one
all-reduce. Their `weight_loader` takes one expert's checkpoint tensor (`shard_id = (expert, "gate" | "up" | "down")`,
Mixtral's `experts.{e}.w1/w3/w2`, Qwen-MoE's `experts.{e}.gate_proj/up_proj/down_proj`) or all experts stacked
(`shard_id=None`: transformers' fused `experts.gate_up_proj` [E, 2I, H] / `experts.down_proj` [E, H, I]);
`load_moe_checkpoint` routes checkpoint names to them.

Three implementations of the routed experts, one result (`moe_reference` is the readable definition):
- CUDA tensors (triton installed, `WEAVELM_DISABLE_TRITON_OPS` unset): the grouped GEMM of `moe_kernels.py`, tokens
  sorted by expert and one launch for all experts per projection.
- CPU tensors: `moe_sorted` - the (token, expert) pairs sorted by expert, one matmul per expert that has tokens
  (or one grouped matmul over all experts when many are hit).
- `moe_reference`: a loop over experts, each over the tokens routed to it (what transformers does).

The experts and router take no LoRA: the LoRA manager wraps only the shared expert's linears, and an adapter of
anything else inside the layer is refused with `lora_unsupported` as the reason (weavelm.lora.targets).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weavelm.distributed import TensorParallelGroup
from weavelm.layers import kernels
from weavelm.layers.expert_parallel import ExpertParallel
from weavelm.layers.activation import SiluAndMul
from weavelm.layers.linear import (Loaded, MergedColumnParallelLinear, RowParallelLinear, _param, copy_shard,
                                   default_weight_loader)
from weavelm.layers.weights import WeightsMapper, load_checkpoint


class ReplicatedLinear(nn.Module):
    """`x @ W^T` with the whole weight on every rank (the router and the shared-expert gate: a few outputs)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param((out_features, in_features), default_weight_loader)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (tokens, top_k) fp32, expert ids (tokens, top_k) int64) of the `top_k` most probable experts; the
    softmax is taken in fp32, and the chosen probabilities divided by their sum when `renormalize`."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _expert_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    """The definition: for each expert, the tokens routed to it run its MLP, weighted by their routing weight, and
    are summed into the output. x (T, H), w13 (E, 2I, H), w2 (E, H, I), topk_* (T, k); returns (T, H). An id `E`
    marks a pair whose expert another expert-parallel rank holds: it is skipped (so are they in every path)."""
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        token, slot = torch.where(topk_ids == e)
        if token.numel() == 0:
            continue
        y = _expert_mlp(x[token], w13[e], w2[e]) * topk_weights[token, slot, None]
        out.index_add_(0, token, y.to(x.dtype))
    return out


# experts hit by one batch above which the CPU path makes one grouped matmul per projection instead of one matmul
# per expert (measured on one core, 128 experts of Qwen3-MoE's shape: 2x faster at 64 tokens, 2x slower at one)
GROUPED_MM_MIN_EXPERTS = 32


def moe_sorted(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
               topk_ids: torch.Tensor) -> torch.Tensor:
    """The CPU path: the (token, expert) pairs sorted by expert and gathered once; then one matmul pair per expert
    that has tokens (at most `E`, however many tokens), or, when many experts are hit and torch has it, one
    `torch._grouped_mm` per projection over all of them; the weighted results are scattered back with one
    `index_add_`."""
    k, num_experts = topk_ids.shape[1], w13.shape[0]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts_t = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]  # id num_experts: another rank's
    counts = counts_t.tolist()
    order = order[:sum(counts)]
    token = order // k
    xs = x[token]
    if hasattr(torch, "_grouped_mm") and sum(n > 0 for n in counts) > GROUPED_MM_MIN_EXPERTS:
        ends = torch.cumsum(counts_t, 0).to(torch.int32)
        gate, up = torch._grouped_mm(xs, w13.transpose(1, 2), offs=ends).chunk(2, dim=-1)
        ys = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=ends)
    else:
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n:
                ys[start:start + n] = _expert_mlp(xs[start:start + n], w13[e], w2[e])
                start += n
    ys = ys * topk_weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))


class FusedExperts(nn.Module):
    """The stacked expert weights of one layer: this rank's share of each expert's intermediate dimension, or, with
    expert parallelism (`ep`), this rank's `num_experts / ep.size` whole experts (`first_expert` onwards; the
    intermediate dimension is not split). Checkpoint tensors of other ranks' experts are skipped unread."""

    PARTS = ("gate", "up", "down")

    def __init__(self, num_experts: int, hidden: int, intermediate: int, tp: TensorParallelGroup,
                 ep: ExpertParallel | None = None):
        super().__init__()
        self.num_experts, self.hidden, self.intermediate, self.ep = num_experts, hidden, intermediate, ep
        self.tp = tp if ep is None else TensorParallelGroup()  # EP: whole experts, no tensor-parallel split
        self.first_expert, self.num_local = (0, num_experts) if ep is None else ep.local_experts(num_experts)
        self.per_rank = self.tp.divide(intermediate, "moe_intermediate_size")
        self.w13_weight = _param((self.num_local, 2 * self.per_rank, hidden), self.weight_loader)
        self.w2_weight = _param((self.num_local, hidden, self.per_rank), self.weight_loader)
        self.use_triton = kernels.triton_ops_enabled()

    def expected_shards(self, param: nn.Parameter) -> set[tuple[int, str]]:
        """The per-expert `shard_id`s (global expert ids) that together fill `param`."""
        parts = ("down",) if param is self.w2_weight else ("gate", "up")
        return {(e, p) for e in range(self.first_expert, self.first_expert + self.num_local) for p in parts}

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: object = None) -> None:
        """One expert's part (`shard_id = (expert, part)`; gate/up (I, H), down (H, I)) or, with `shard_id=None`,
        every expert's at once (w13 (E, 2I, H) as [gate | up], w2 (E, H, I)); copies this rank's slice."""
        n, r, big_i, e_all = self.per_rank, self.tp.rank, self.intermediate, self.num_experts
        if shard_id is None:
            if self.ep is not None:  # this rank's run of whole experts
                shape = (e_all, self.hidden, big_i) if param is self.w2_weight else (e_all, 2 * big_i, self.hidden)
                copy_shard(param.data, loaded, shape, 0, self.first_expert)
                return
            if param is self.w2_weight:
                copy_shard(param.data, loaded, (e_all, self.hidden, big_i), 2, r * n)
                return
            for i in range(2):
                copy_shard(param.data[:, i * n:(i + 1) * n], loaded, (e_all, 2 * big_i, self.hidden), 1,
                           i * big_i + r * n)
            return
        if not (isinstance(shard_id, tuple) and len(shard_id) == 2 and shard_id[1] in self.PARTS):
            raise ValueError(f"names part {shard_id!r}; expert weights load (expert, 'gate' | 'up' | 'down')")
        expert, part = shard_id
        if not isinstance(expert, int) or not 0 <= expert < e_all:
            raise ValueError(f"is for expert {expert}, but the layer has experts 0..{e_all - 1} (num_experts in "
                             f"config.json)")
        if (part == "down") != (param is self.w2_weight):
            raise ValueError(f"is an expert's {part} projection, loaded into the wrong stacked weight")
        expert -= self.first_expert
        if not 0 <= expert < self.num_local:
            return  # another expert-parallel rank's expert: not read
        if part == "down":
            copy_shard(param.data[expert], loaded, (self.hidden, big_i), 1, r * n)
        else:
            i = 0 if part == "gate" else 1
            copy_shard(param.data[expert, i * n:(i + 1) * n], loaded, (big_i, self.hidden), 0, r * n)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum of the routed experts' outputs (T, H) (summed over ranks by the caller). With
        EP, `topk_ids` are local (0 .. num_local - 1), and `num_local` marks a pair held by another rank."""
        w13, w2 = self.w13_weight, self.w2_weight
        if self.use_triton and kernels.triton_device(x):
            from weavelm.layers import moe_kernels
            return moe_kernels.fused_moe(x, w13, w2, topk_weights, topk_ids, skip_marked=self.ep is not None)
        if x.is_cpu:
            return moe_sorted(x, w13, w2, topk_weights, topk_ids)
        return moe_reference(x, w13, w2, topk_weights, topk_ids)


class SharedExpertMLP(nn.Module):
    """The dense expert every token also runs (Qwen2-MoE's `shared_expert`): gate/up column-parallel, down
    row-parallel (it all-reduces itself), so LoRA wraps it like any dense MLP."""

    def __init__(self, hidden: int, intermediate: int, tp: TensorParallelGroup):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate, intermediate], False, tp)
        self.down_proj = RowParallelLinear(intermediate, hidden, False, tp)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class FusedMoE(nn.Module):
    """One layer's mixture-of-experts feed-forward. Submodules are named as the checkpoints name theirs: `gate`
    (router), `experts` (stacked weights), and with `shared_intermediate` `shared_expert` and
    `shared_expert_gate`. `forward(x)` maps (T, H) to (T, H), the same on every rank of a tensor-parallel group.
    With `ep` (`weavelm.layers.expert_parallel`) the experts are spread over the expert-parallel group instead of
    sharded; routing stays over all experts, and the shared expert stays tensor-parallel."""

    lora_unsupported = ("the experts and router of a mixture-of-experts layer (FusedMoE) take no LoRA adapters; "
                        "adapt the attention and dense layers (and a shared expert) instead, and drop the experts "
                        "from target_modules")

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, renormalize: bool,
                 tp: TensorParallelGroup = TensorParallelGroup(), shared_intermediate: int = 0,
                 ep: ExpertParallel | None = None):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) must be between 1 and the number of experts "
                             f"({num_experts})")
        self.tp, self.top_k, self.renormalize, self.ep, self.num_experts = tp, top_k, renormalize, ep, num_experts
        self.gate = ReplicatedLinear(hidden, num_experts)
        self.experts = FusedExperts(num_experts, hidden, intermediate, tp, ep)
        self.shared_expert = SharedExpertMLP(hidden, shared_intermediate, tp) if shared_intermediate else None
        self.shared_expert_gate = ReplicatedLinear(hidden, 1) if shared_intermediate else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, expert ids), each (T, top_k), of the tokens x."""
        return select_experts(self.gate(x), self.top_k, self.renormalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        if self.ep is None:
            out = self.tp.all_reduce(self.experts(x, weights, ids))
        else:
            out = self.ep.combine(x, weights, ids, self.num_experts, self.experts)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


# checkpoint names of one expert's projections -> FusedExperts part
EXPERT_PARTS = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_PER_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")
_ALL_EXPERTS = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<proj>gate_up_proj|down_proj)$")


def load_moe_checkpoint(model: nn.Module, weights: Iterable[tuple[str, Any]], *, mapper: WeightsMapper,
                        stacked: Mapping[str, tuple[str, object]], skip: Iterable[str] = ()) -> set[str]:
    """`load_checkpoint` for a model with `FusedMoE` layers: expert tensors (per expert, `...experts.{e}.{proj}.weight`
    with `proj` in `EXPERT_PARTS`, or transformers' fused `...experts.gate_up_proj` / `...experts.down_proj`) go to
    the stacked weights' `weight_loader`; everything else to `load_checkpoint`. A stacked weight counts as filled
    once every expert's parts arrived. KeyError / ValueError name the tensor, as `load_checkpoint`'s do."""
    params = dict(model.named_parameters())
    seen: dict[str, set] = {}
    done: set[str] = set()

    def load_expert(ckpt_name: str, pname: str, tensor: Any, shard_id: object) -> None:
        param = params.get(pname)
        if param is None:
            raise KeyError(f"unexpected tensor {ckpt_name!r}: the {type(model).__name__} architecture has no "
                           f"experts there")
        try:
            param.weight_loader(param, tensor, shard_id)
        except ValueError as e:
            raise ValueError(f"tensor {ckpt_name!r} {e}") from e
        if shard_id is None:
            done.add(pname)
            return
        got = seen.setdefault(pname, set())
        got.add(shard_id)
        owner = model.get_submodule(pname.rsplit(".", 1)[0])
        if got >= owner.expected_shards(param):
            done.add(pname)

    def others():
        for ckpt_name, tensor in weights:
            name = mapper.map_name(ckpt_name)
            m = _PER_EXPERT.match(name)
            if m and m["proj"] in EXPERT_PARTS:
                part = EXPERT_PARTS[m["proj"]]
                pname = m["prefix"] + (".w2_weight" if part == "down" else ".w13_weight")
                load_expert(ckpt_name, pname, tensor, (int(m["expert"]), part))
                continue
            m = _ALL_EXPERTS.match(name)
            if m:
                load_expert(ckpt_name, m["prefix"] + (".w2_weight" if m["proj"] == "down_proj" else ".w13_weight"),
                            tensor, None)
                continue
            yield ckpt_name, tensor

    loaded = load_checkpoint(model, others(), mapper=mapper, stacked=stacked, skip=skip)
    return loaded | done
