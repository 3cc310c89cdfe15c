"""`quantization: fp8`: fp8 (float8_e4m3fn) weights kept fp8 in memory (vLLM's `Fp8Config`).

Picked by `quantization: auto` for a checkpoint whose config.json says `quantization_config: {quant_method: fp8}`:
- block-wise (`weight_block_size: [128, 128]`, the Qwen3-*-FP8 and DeepSeek-V3 format): float8_e4m3fn `weight`
  and a float32 `weight_scale_inv` per block (W = weight * scale; blocks at the right and bottom edges partial);
  `activation_scheme` must be dynamic;
- per-tensor: float8_e4m3fn `weight` and a `weight_scale` per checkpoint tensor (vLLM's `Fp8Config` without
  `weight_block_size`); with `activation_scheme: static` also an `input_scale` per tensor.
`ignored_layers` (vLLM) / `modules_to_not_convert` (transformers) name layers stored in full precision.

Named explicitly on a float (bf16/fp16/fp32) checkpoint, `quantization: fp8` quantizes every linear layer on the
fly, per output channel (scale = max |row| / 448), as each tensor loads (under tensor parallelism a row-parallel
layer's rank scales the rows of its own columns). The embedding and the LM head stay dense (as in vLLM). What runs per device: see `fp8_layer.py` (W8A8 on CUDA sm89+, weight-only elsewhere).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from weavelm.core.hookspecs import hookimpl
from weavelm.core.interfaces import NoOptions
from weavelm.core.quantization import QuantizationConfig, QuantSpec, layer_kind
from weavelm.errors import ConfigError, LoadError
from weavelm.plugins.quantization.fp8_layer import Fp8Format, Fp8LinearMethod, how_it_runs, is_ignored


class Fp8Config(QuantizationConfig):
    name = "fp8"
    description = ("fp8 weights kept fp8: block-wise / per-tensor fp8 checkpoints, or a float checkpoint quantized "
                   "per channel on load; W8A8 on CUDA sm89+, weight-only elsewhere.")
    Options = NoOptions

    def __init__(self, options: Any, fmt: Fp8Format = Fp8Format(from_float=True), ignored: tuple[str, ...] = ()):
        super().__init__(options)
        self.fmt = fmt
        self.ignored = ignored

    @classmethod
    def select(cls, options, spec: QuantSpec, candidates: Mapping[str, type[QuantizationConfig]]
               ) -> QuantizationConfig:
        reasons = cls.check(spec)
        if reasons:
            raise ConfigError([("quantization.name", f"'fp8' cannot run here: {'; '.join(reasons)}")])
        from_ckpt = cls.from_checkpoint(spec)
        if from_ckpt is not None:
            return from_ckpt
        method = spec.checkpoint_quant.get("quant_method") if spec.checkpoint_quant else None
        if method is not None:
            raise ConfigError([("quantization.name", f"the checkpoint is already {method!r}-quantized; fp8 "
                                                     f"quantizes float checkpoints only (use quantization: auto)")])
        return cls(options)

    @classmethod
    def check(cls, spec: QuantSpec) -> list[str]:
        if any(t.startswith(("Q", "IQ")) for t in spec.weight_types.values()):
            return ["the checkpoint is already quantized (GGUF); use quantization: gguf or none"]
        return []

    @classmethod
    def from_checkpoint(cls, spec: QuantSpec) -> Fp8Config | None:
        q = spec.checkpoint_quant
        if not q or q.get("quant_method") != "fp8":
            return None
        where = "config.json quantization_config"
        scheme = q.get("activation_scheme", "dynamic")
        if scheme not in ("dynamic", "static"):
            raise LoadError(f"{where}.activation_scheme: {scheme!r} is not 'dynamic' or 'static'")
        block = q.get("weight_block_size")
        if block is not None:
            if (not isinstance(block, (list, tuple)) or len(block) != 2
                    or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
                raise LoadError(f"{where}.weight_block_size: {block!r} must be two positive integers, e.g. "
                                f"[128, 128]")
            if scheme != "dynamic":
                raise LoadError(f"{where}.activation_scheme: block-wise fp8 (weight_block_size) needs 'dynamic' "
                                f"activations (got {scheme!r})")
        fmt_name = q.get("fmt", "e4m3")
        if fmt_name not in ("e4m3", "float8_e4m3fn"):
            raise LoadError(f"{where}.fmt: {fmt_name!r} is not supported (fp8 weights must be e4m3)")
        ignored = q.get("ignored_layers") or q.get("modules_to_not_convert") or []
        if not isinstance(ignored, (list, tuple)) or not all(isinstance(n, str) for n in ignored):
            raise LoadError(f"{where}.ignored_layers: must be a list of module names (got {ignored!r})")
        fmt = Fp8Format(block=tuple(block) if block is not None else None, static_input=scheme == "static")
        return cls(cls.Options(), fmt, tuple(ignored))

    @classmethod
    def how_it_runs(cls, device: str) -> str:
        return how_it_runs(device)

    def get_quant_method(self, layer, prefix):
        if layer_kind(layer) != "linear" or is_ignored(prefix, self.ignored):
            return None
        return Fp8LinearMethod(self.fmt)


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("quantization", Fp8Config.name, Fp8Config)
