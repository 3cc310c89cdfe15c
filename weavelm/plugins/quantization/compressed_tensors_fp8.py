"""`quantization: compressed-tensors-fp8`: compressed-tensors' `float-quantized` checkpoints (llm-compressor's
FP8 / FP8_DYNAMIC presets), weights kept fp8 (the same layer method as `fp8`, `fp8_layer.py`).

Picked by `quantization: auto` when config.json's `quantization_config` has `quant_method: compressed-tensors` and
every config group is in the `float-quantized` format (top-level `format` or the group's own): 8-bit float weights
with strategy `tensor` (a `weight_scale` of shape (1,) per tensor) or `channel` ((rows, 1)), targeting `Linear`
(or named modules), input activations dynamic per token (or none: treated as dynamic on GPUs with fp8) or static
per tensor (an `input_scale` per tensor). Modules in `ignore` stay dense. Other compressed-tensors formats (e.g.
`pack-quantized` int4) are left to the schemes that claim them: `from_checkpoint` returns None for them. The config is
parsed by the `compressed-tensors` library (`pip install weavelm[quant]`).
"""

from __future__ import annotations

from typing import Any

from weavelm.core.hookspecs import hookimpl
from weavelm.core.interfaces import NoOptions
from weavelm.core.quantization import QuantizationConfig, QuantSpec, layer_kind
from weavelm.errors import LoadError, MissingExtraError
from weavelm.plugins.quantization.fp8_layer import Fp8Format, Fp8LinearMethod, how_it_runs, is_ignored

FORMAT = "float-quantized"
WHERE = "config.json quantization_config"


class CompressedTensorsFp8Config(QuantizationConfig):
    name = "compressed-tensors-fp8"
    description = "compressed-tensors float-quantized (per-tensor / per-channel fp8) checkpoints, weights kept fp8."
    Options = NoOptions

    def __init__(self, options: Any, fmt: Fp8Format = Fp8Format(), targets: tuple[str, ...] = ("Linear",),
                 ignored: tuple[str, ...] = ()):
        super().__init__(options)
        self.fmt, self.targets, self.ignored = fmt, targets, ignored

    @classmethod
    def select(cls, options, spec: QuantSpec, candidates) -> QuantizationConfig:
        picked = cls.from_checkpoint(spec)
        if picked is None:
            from weavelm.errors import ConfigError
            raise ConfigError([("quantization.name", "'compressed-tensors-fp8' runs compressed-tensors "
                                                     "float-quantized checkpoints only; this one is not (use "
                                                     "quantization: auto)")])
        return picked

    @classmethod
    def from_checkpoint(cls, spec: QuantSpec) -> CompressedTensorsFp8Config | None:
        raw = spec.checkpoint_quant
        if not raw or raw.get("quant_method") != "compressed-tensors":
            return None
        groups = raw.get("config_groups") or {}
        top = raw.get("format")
        if not isinstance(groups, dict) or not groups or not all(
                isinstance(g, dict) and (g.get("format") or top) == FORMAT for g in groups.values()):
            return None  # another compressed-tensors format: not ours
        try:
            from compressed_tensors import QuantizationConfig as CTConfig
        except ImportError as e:
            raise MissingExtraError("compressed_tensors", "quant", "a compressed-tensors checkpoint") from e
        try:
            config = CTConfig.model_validate(dict(raw))
        except Exception as e:  # pydantic's ValidationError names the field
            raise LoadError(f"{WHERE}: not a valid compressed-tensors config: {e}") from e
        if len(config.config_groups) != 1:
            raise LoadError(f"{WHERE}.config_groups: one float-quantized group is supported (got "
                            f"{len(config.config_groups)})")
        (group_name, scheme), = config.config_groups.items()
        at = f"{WHERE}.config_groups.{group_name}"
        w = scheme.weights
        if w is None or w.type != "float" or w.num_bits != 8:
            raise LoadError(f"{at}.weights: float-quantized fp8 needs 8-bit float weights (got {w!r})")
        if str(w.strategy.value if hasattr(w.strategy, "value") else w.strategy) not in ("tensor", "channel"):
            raise LoadError(f"{at}.weights.strategy: {w.strategy!r} is not supported (tensor or channel)")
        a = scheme.input_activations
        static = False
        if a is not None:
            strategy = str(a.strategy.value if hasattr(a.strategy, "value") else a.strategy)
            static = not a.dynamic
            if static and strategy != "tensor":
                raise LoadError(f"{at}.input_activations: static activation scales must be per tensor "
                                f"(got strategy {strategy!r})")
        return cls(cls.Options(), Fp8Format(static_input=static), tuple(scheme.targets), tuple(config.ignore or ()))

    @classmethod
    def how_it_runs(cls, device: str) -> str:
        return how_it_runs(device)

    def get_quant_method(self, layer, prefix):
        if layer_kind(layer) != "linear" or is_ignored(prefix, self.ignored):
            return None
        if "Linear" not in self.targets and not is_ignored(prefix, self.targets):
            return None  # targets name modules (same matching as ignore)
        return Fp8LinearMethod(self.fmt)


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("quantization", CompressedTensorsFp8Config.name, CompressedTensorsFp8Config)
