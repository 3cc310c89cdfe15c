"""Giving a built model LoRA: replace each layer some LoRA layer can replace (by type), and describe what adapters
may target. Works for any architecture built from `weavelm.layers`; the model only declares
`packed_modules_mapping` (packed layer -> the checkpoint parts it stacks, e.g. `qkv_proj` <- q/k/v_proj) and
`hf_to_weavelm_mapper` (how checkpoint module names map onto its own).
"""

from __future__ import annotations

import torch
from torch import nn

from weavelm.errors import ConfigError
from weavelm.layers import WeightsMapper
from weavelm.lora.batch import LoRABatchState
from weavelm.lora.layers import LORA_LAYER_CLASSES, BaseLayerWithLoRA, ParallelLMHeadWithLoRA
from weavelm.lora.targets import LoRATarget, LoRATargets


def wrap_model(model: nn.Module, state: LoRABatchState, num_slots: int, max_rank: int, dtype: torch.dtype,
               device: torch.device) -> dict[str, BaseLayerWithLoRA]:
    """Replace every module that a LoRA layer class can replace (`can_replace_layer`) by that LoRA layer, in
    place; returns {module name: wrapper}. ConfigError when the model has nothing LoRA can wrap."""
    wrapped: dict[str, BaseLayerWithLoRA] = {}
    for name, module in list(model.named_modules()):
        cls = next((c for c in LORA_LAYER_CLASSES if c.can_replace_layer(module)), None)
        if cls is None or not name:
            continue
        parent_name, _, attr = name.rpartition(".")
        wrapper = cls(module, state, num_slots, max_rank, dtype, device)
        setattr(model.get_submodule(parent_name), attr, wrapper)
        wrapped[name] = wrapper
    if not wrapped:
        raise ConfigError([("lora", f"the {type(model).__name__} architecture has no layer LoRA can wrap (it is not "
                                    f"built from weavelm.layers' linears and embeddings); remove `lora:`")])
    return wrapped


def lora_targets(model: nn.Module, wrapped: dict[str, BaseLayerWithLoRA]) -> LoRATargets:
    """The adaptable modules of a wrapped model, named as adapters name them (mapped): a packed layer's parts by
    the model's `packed_modules_mapping`, any other layer (a fused checkpoint module included) by its own name."""
    packed: dict[str, list[str]] = dict(getattr(model, "packed_modules_mapping", None) or {})
    mapper: WeightsMapper = getattr(model, "hf_to_weavelm_mapper", None) or WeightsMapper()
    modules: dict[str, LoRATarget] = {}
    for name, wrapper in wrapped.items():
        parent, _, attr = name.rpartition(".")
        prefix = parent + "." if parent else ""
        shapes = wrapper.part_shapes()
        parts = packed.get(attr)
        if parts is not None and len(parts) != len(shapes):
            raise ConfigError([("lora", f"{type(model).__name__}.packed_modules_mapping[{attr!r}] lists "
                                        f"{len(parts)} parts, but {name} stacks {len(shapes)}")])
        if parts is not None:
            for i, (part, (in_f, out_f)) in enumerate(zip(parts, shapes)):
                modules[prefix + part] = LoRATarget(name, i, in_f, out_f, wrapper.embedding)
        else:
            in_f = shapes[0][0]
            modules[name] = LoRATarget(name, None, in_f, sum(out for _, out in shapes), wrapper.embedding)
    tied = not any(isinstance(w, ParallelLMHeadWithLoRA) for w in wrapped.values())
    refused = {name: why for name, m in model.named_modules() if (why := getattr(type(m), "lora_unsupported", None))}
    return LoRATargets(modules, mapper, tied_embeddings=tied, refused=refused)

