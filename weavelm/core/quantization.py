"""The `quantization` plugin kind: vLLM's `QuantizationConfig` / `QuantizeMethodBase` shape.

A `QuantizationConfig` (a registered component, chosen by YAML `quantization: {name: ...}`, or by `auto` from what
the checkpoint holds) answers, for each layer of a built model, `get_quant_method(layer, prefix)`: a
`QuantizeMethodBase` that owns that layer's weight, or None to leave the layer as it is. The model runner's loading
code does vLLM's three steps:

1. build the model (each linear layer creates its dense `weight` as usual), then `attach(model, config)` calls
   `method.create_weights(layer)` for every layer the config claims (a method may replace the weight's
   `weight_loader` to receive the checkpoint tensors in their stored, quantized form);
2. the loader streams the checkpoint into the model;
3. `process_weights_after_loading(model)` lets each method repack its layer once into the form its kernel
   consumes (int4/int8 packs on CPU; fp8 or GPU int4 layouts later) and free the dense weight.

Afterwards a quantized layer's matmul is `layer.quant_method.apply(layer, x, bias)` (see
`weavelm.layers.linear_apply`); a layer without a method runs `F.linear` on its weight.
Methods work on any device; each config says in `check(spec)` where it can run, as attention backends do.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel

from weavelm.core.interfaces import Component, NoOptions


@dataclass
class QuantSpec:
    """What a quantization config is chosen and checked with.

    device: "cpu" | "cuda"; dtype: the engine's activation dtype; world_size: tensor-parallel ranks;
    weight_types: the checkpoint's stored tensor types by Hugging Face name (e.g. {"model.layers.0.mlp.down_proj.weight":
    "Q4_1"}; empty for float checkpoints), from `ModelLoader.weight_types(path)`.
    """

    device: str
    dtype: torch.dtype
    world_size: int = 1
    weight_types: Mapping[str, str] = field(default_factory=dict)


class QuantizeMethodBase(ABC):
    """How one layer's weight is created, repacked and multiplied (vLLM's `QuantizeMethodBase`).

    Called by the loading code, in order: `create_weights(layer)` once after the model is built (the layer's dense
    `weight` parameter exists; a method may wrap its `weight_loader`), the checkpoint load, then
    `process_weights_after_loading(layer)` once; then `apply(layer, x, bias)` on every forward, from the layer.
    """

    @abstractmethod
    def create_weights(self, layer: torch.nn.Module) -> None:
        """Prepare `layer` to receive its checkpoint tensors (e.g. wrap `layer.weight.weight_loader`)."""

    @abstractmethod
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Repack the loaded weight into this method's kernel format (called once, after every tensor arrived)."""

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x @ W^T + bias` for `x` of shape (tokens, in_features), in x's dtype."""


class QuantizationConfig(Component, ABC):
    """A registered quantization scheme (kind `quantization`). Built as `cls(options)`; `select` may choose
    another scheme (the `auto` selector does)."""

    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: BaseModel):
        self.options = options

    @classmethod
    def select(cls, options: BaseModel, spec: QuantSpec,
               candidates: Mapping[str, type[QuantizationConfig]]) -> QuantizationConfig | None:
        """The config to use for `spec` (None: no quantization). Default: this class, if `check(spec)` passes;
        otherwise a ConfigError with the reasons."""
        reasons = cls.check(spec)
        if reasons:
            from weavelm.errors import ConfigError
            raise ConfigError([("quantization.name", f"{cls.name!r} cannot run here: {'; '.join(reasons)}")])
        return cls(options)

    @classmethod
    def check(cls, spec: QuantSpec) -> list[str]:
        """The reasons this scheme cannot run for `spec` (empty: it runs)."""
        return []

    @abstractmethod
    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        """The method owning `layer`'s weight (`prefix`: its module name, e.g. `layers.0.mlp.down_proj`), or None
        to leave it unquantized. Called for every module of the model."""


def layer_kind(layer: torch.nn.Module) -> str | None:
    """What a layer offers a quantization method: "linear" (its forward is `x @ W^T + b` through
    `linear_apply`), "embedding" (rows looked up densely, and `compute_logits` multiplies through its method), or
    None. Layers declare it as the class attribute `quant_kind`."""
    return getattr(type(layer), "quant_kind", None)


def attach(model: torch.nn.Module, config: QuantizationConfig | None) -> int:
    """Step 1: give every layer `config` claims its method (`layer.quant_method`) and let it create its weights.
    Returns how many layers were claimed."""
    if config is None:
        return 0
    claimed = 0
    for prefix, module in model.named_modules():
        method = config.get_quant_method(module, prefix)
        if method is None:
            continue
        module.quant_method = method
        method.create_weights(module)
        claimed += 1
    return claimed


def process_weights_after_loading(model: torch.nn.Module) -> None:
    """Step 3 (vLLM's loader's last step): each attached method repacks its layer once."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)


def describe(model: torch.nn.Module) -> dict[str, int]:
    """Layers per method class name (for logs and `model_info`)."""
    out: dict[str, int] = {}
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            key = getattr(method, "kind", type(method).__name__)
            out[key] = out.get(key, 0) + 1
    return out


def resolve(section: Any, registry: Any, spec: QuantSpec) -> QuantizationConfig | None:
    """The config for the engine's `quantization` section (a ComponentConfig) and `spec`."""
    cls = registry.get("quantization", section.name)
    return cls.select(section.options, spec, registry.classes("quantization"))
