"""Pipeline parallelism for model authors (vLLM's `make_layers` / `PPMissingLayer` / `IntermediateTensors`).

With `pipeline_parallel_size` P the decoder layers are split over P stages, each a group of tensor-parallel ranks.
Stage s builds and loads only its layers (`PipelineStage.start`..`end`); the embedding lives on the first stage, the
final norm and LM head on the last (a tied head keeps the embedding on the last stage too). The other modules are
`PPMissingLayer` placeholders, which have no parameters, so the checkpoint tensors of other stages are skipped by
`load_checkpoint` without being read.

A pipeline-capable architecture (the contract, `ModelArchitecture.supports_pp`):

- sets `supports_pp = True` and takes the rank's pipeline group as a keyword: `cls(hf_config, tp, pp=pp)` (`pp`:
  a `TensorParallelGroup` whose rank is the stage index; the runner passes it only when P > 1, so `cls(hf_config,
  tp)` keeps working, and an architecture without `supports_pp` is refused with a ConfigError);
- numbers its `Attention` layers by their KV-cache index on this rank (`PipelineStage.kv_index`), so
  `attention_layout()` counts only the stage's layers and each stage allocates KV blocks for its layers only;
- `forward(input_ids, positions, batch, intermediate_tensors=None)`: a non-first stage starts from the
  `IntermediateTensors` the previous stage sent (its `input_ids` are still given, for shapes), a non-last stage
  returns `IntermediateTensors` instead of hidden states;
- `make_empty_intermediate_tensors(num_tokens, dtype, device)`: the buffers a stage receives into (every stage
  knows the step's token count from the scheduler output, so no shapes travel).

Only the last stage computes logits and samples; the engine core hands every stage the sampled tokens of earlier
steps in the next `SchedulerOutput.new_token_ids`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from weavelm.distributed import TensorParallelGroup


def stage_layer_range(num_layers: int, stage: int, num_stages: int) -> tuple[int, int]:
    """`(start, end)` of stage `stage`'s layers: an even split, the remainder going to the stages before the last
    (which also holds the LM head), as vLLM's `get_pp_indices`. ValueError when there are fewer layers than stages."""
    if num_layers < num_stages:
        raise ValueError(f"the model has {num_layers} layers, fewer than the {num_stages} pipeline stages; lower "
                         f"pipeline_parallel_size to at most {num_layers}")
    sizes = [num_layers // num_stages] * num_stages
    for i in range(num_layers % num_stages):
        sizes[-2 - i if num_stages > 1 else 0] += 1
    start = sum(sizes[:stage])
    return start, start + sizes[stage]


@dataclass(frozen=True)
class PipelineStage:
    """This rank's stage: index `rank` of `size` stages, holding decoder layers `start`..`end` (exclusive)."""

    rank: int = 0
    size: int = 1
    start: int = 0
    end: int = 0

    @classmethod
    def of(cls, num_layers: int, pp: TensorParallelGroup | None = None) -> PipelineStage:
        """The stage of `pp`'s rank over `num_layers` layers (the whole model without a pipeline group)."""
        if pp is None or pp.world_size == 1:
            return cls(0, 1, 0, num_layers)
        return cls(pp.rank, pp.world_size, *stage_layer_range(num_layers, pp.rank, pp.world_size))

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    def owns(self, layer: int) -> bool:
        return self.start <= layer < self.end

    def kv_index(self, layer: int) -> int:
        """The KV-cache (and attention impl) index of global layer `layer` on this stage."""
        return layer - self.start


class PPMissingLayer(nn.Identity):
    """The placeholder for a module another pipeline stage holds: no parameters (its checkpoint tensors are
    skipped unread); calling it returns its first argument."""


@dataclass
class IntermediateTensors:
    """What one pipeline stage hands the next: named tensors of shape (num_tokens, ...), the same names and
    shapes each step for a given token count (the decoders send `hidden_states` and `residual`)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.tensors))  # one order on every stage: the send/recv sequence

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return [(name, self.tensors[name]) for name in self]


def make_layers(num_layers: int, stage: PipelineStage, build: Callable[[int], nn.Module]) -> nn.ModuleList:
    """A ModuleList of `num_layers` entries named as the checkpoint numbers them: `build(i)` for the stage's
    layers, a `PPMissingLayer` for the others."""
    return nn.ModuleList(build(i) if stage.owns(i) else PPMissingLayer() for i in range(num_layers))


def missing_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The module names (with a trailing dot) that another stage holds: checkpoint tensors under them are not
    this rank's."""
    return tuple(name + "." for name, m in model.named_modules() if isinstance(m, PPMissingLayer) and name)
