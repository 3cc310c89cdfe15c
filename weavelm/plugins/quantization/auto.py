"""`quantization: auto` (the default) and `quantization: none`.

`auto` keeps the checkpoint's own precision: a checkpoint whose config.json carries a `quantization_config` runs the
registered scheme whose `from_checkpoint` claims it (fp8, GPTQ, AWQ, ...); a GGUF file whose linear weights are stored quantized runs on its
blocks repacked for the CPU kernels (`gguf`) when that scheme's `check` passes here; float checkpoints run
unquantized. `none` always runs dense weights (a GGUF file is dequantized at load, as before).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from weavelm.core.hookspecs import hookimpl
from weavelm.core.interfaces import NoOptions
from weavelm.core.quantization import QuantizationConfig, QuantSpec

logger = logging.getLogger("weavelm.quantization")


class NoQuantization(QuantizationConfig):
    name = "none"
    description = "Dense weights in the engine's dtype (GGUF blocks are dequantized at load)."
    Options = NoOptions

    @classmethod
    def select(cls, options, spec: QuantSpec, candidates) -> None:
        return None

    def get_quant_method(self, layer, prefix):
        return None


class AutoQuantization(QuantizationConfig):
    name = "auto"
    description = "The checkpoint's own scheme: GGUF blocks stay quantized where a kernel runs them; else none."
    Options = NoOptions

    @classmethod
    def select(cls, options, spec: QuantSpec,
               candidates: Mapping[str, type[QuantizationConfig]]) -> QuantizationConfig | None:
        if spec.checkpoint_quant:
            for name, cls_ in candidates.items():
                picked = cls_.from_checkpoint(spec) if name not in (cls.name, "none") else None
                if picked is not None:
                    reasons = type(picked).check(spec)
                    if reasons:
                        from weavelm.errors import ConfigError
                        raise ConfigError([("quantization", f"the checkpoint is {name!r}-quantized, which cannot "
                                                            f"run here: {'; '.join(reasons)}")])
                    logger.info("quantization: auto picked %s (from the checkpoint's quantization_config)", name)
                    return picked
        gguf = candidates.get("gguf")
        if gguf is None or not any(t.startswith(("Q", "IQ")) for t in spec.weight_types.values()):
            return None
        reasons = gguf.check(spec)
        if reasons:
            logger.info("quantization: auto runs dense weights (gguf cannot run here: %s)", "; ".join(reasons))
            return None
        logger.info("quantization: auto picked gguf (weights stay quantized)")
        return gguf(gguf.Options())

    def get_quant_method(self, layer, prefix):
        return None


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("quantization", AutoQuantization.name, AutoQuantization)
    registry.add("quantization", NoQuantization.name, NoQuantization)
