"""From checkpoint names to a model's parameters: the prefix map and the loop every architecture's
`load_weights` can share.

A model built from these layers names its modules as the checkpoint does, except for a prefix
(`WeightsMapper`, vLLM's `hf_to_vllm_mapper`: the built-in decoders drop the checkpoint's `model.`) and for packed
layers, which take several checkpoint tensors (`stacked`: `q_proj` -> (`qkv_proj`, "q")). LoRA maps the module
names of a PEFT adapter with the same mapper and the model's `packed_modules_mapping`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from weavelm.layers.linear import default_weight_loader


@dataclass(frozen=True)
class WeightsMapper:
    """Rename checkpoint (Hugging Face) names to module names: the first prefix of `orig_to_new_prefix` that a name
    starts with is replaced (picklable; it travels in `LoRATargets`)."""

    orig_to_new_prefix: Mapping[str, str] = field(default_factory=dict)

    def map_name(self, name: str) -> str:
        for old, new in self.orig_to_new_prefix.items():
            if name.startswith(old):
                return new + name[len(old):]
        return name


def load_checkpoint(model: nn.Module, weights: Iterable[tuple[str, Any]], *, mapper: WeightsMapper,
                    stacked: Mapping[str, tuple[str, object]], skip: Iterable[str] = ()) -> set[str]:
    """Hand each checkpoint tensor (whole-model shape; a tensor or LazyTensor) to its parameter's `weight_loader`,
    which copies this rank's shard. `stacked[part] = (packed module, shard_id)` routes a part's tensor to its
    packed layer; names in `skip` (after mapping) are ignored, and so are rotary `inv_freq` buffers and the tensors of
    modules another pipeline stage holds (`weavelm.layers.pipeline.PPMissingLayer`). Returns the
    parameters filled, a packed one once each of its parts arrived (or its fused tensor did). KeyError naming the
    tensor for a name the model lacks; ValueError naming it for a shape that does not fit."""
    from weavelm.layers.pipeline import missing_prefixes

    params = dict(model.named_parameters())
    skip = set(skip)
    other_stages = missing_prefixes(model)  # pipeline parallelism: modules another stage holds
    expected: dict[str, set] = {}
    for packed, shard_id in stacked.values():
        expected.setdefault(packed, set()).add(shard_id)
    loaded: set[str] = set()
    shards_seen: dict[str, set] = {}
    for ckpt_name, tensor in weights:
        name = mapper.map_name(ckpt_name)
        if name.endswith("rotary_emb.inv_freq") or name in skip or name.startswith(other_stages):
            continue  # another stage's tensor is never read (a LazyTensor stays on disk)
        shard_id, parts = None, name.split(".")
        if len(parts) >= 2 and parts[-2] in stacked:
            packed, shard_id = stacked[parts[-2]]
            name = ".".join(parts[:-2] + [packed, parts[-1]])
        param = params.get(name)
        if param is None:
            raise KeyError(f"unexpected tensor {ckpt_name!r}: the {type(model).__name__} architecture has no such "
                           f"weight")
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            loader(param, tensor, shard_id)
        except ValueError as e:
            raise ValueError(f"tensor {ckpt_name!r} {e}") from e
        if shard_id is None:
            loaded.add(name)
        else:
            shards_seen.setdefault(name, set()).add(shard_id)
    for name, seen in shards_seen.items():
        if seen >= expected[name.split(".")[-2]]:
            loaded.add(name)
    return loaded
