"""Building the model from the runner's context: loader, architecture, dtype, device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from weavelm.core.config import EngineConfig
from weavelm.core.contexts import RunnerContext
from weavelm.core.multimodal import text_config_of
from weavelm.core.model_size import build_model, check_model_size, default_dtype
from weavelm.core.quantization import QuantSpec, attach, process_weights_after_loading
from weavelm.errors import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(config: EngineConfig, hf_config: Any, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return DTYPES[config.dtype]
    if device.type == "cpu":
        return torch.float32
    ckpt = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
    ckpt = DTYPES.get(str(ckpt).removeprefix("torch."), None) if ckpt is not None else None
    return ckpt if ckpt in (torch.float16, torch.bfloat16) else torch.bfloat16


def model_max_len(config: EngineConfig, hf_config: Any) -> int:
    limit = getattr(text_config_of(hf_config), "max_position_embeddings", None) or 4096
    if config.max_model_len is None:
        return int(limit)
    if config.max_model_len > limit:
        raise ConfigError([("max_model_len", f"{config.max_model_len} exceeds the model's context of {limit}; "
                                             f"set max_model_len <= {limit}")])
    return config.max_model_len


@dataclass
class ModelBundle:
    model: Any
    hf_config: Any
    dtype: torch.dtype
    max_model_len: int
    vocab_size: int


def load_model_bundle(context: RunnerContext) -> ModelBundle:
    """Read the config through the context's loader, build the architecture on the device in the engine's dtype
    with the rank's tensor-parallel group (`context.tp`), and load its weights (each rank reads its shard)."""
    config, device, loader, tp = context.config, context.device, context.loader, context.tp
    if not config.model:
        raise ConfigError([("model", "no model given; set `model:` to a model directory or .gguf file")])
    hf_config = loader.load_hf_config(config.model)
    model_cls = context.model_class(hf_config)
    dtype = resolve_dtype(config, hf_config, device)
    check_model_size(model_cls, hf_config, dtype, device, loader, config.model, tp)
    with default_dtype(dtype), torch.device(device):
        model = build_model(model_cls, hf_config, tp)
    quant = quantization_config(context, loader, device, dtype, hf_config)
    attach(model, quant)                                 # 1. methods claim their layers
    loader.load_weights(model, config.model)             # 2. the checkpoint streams in
    process_weights_after_loading(model)                 # 3. methods repack once
    model.eval()
    return ModelBundle(model, hf_config, dtype, model_max_len(config, hf_config),
                       text_config_of(hf_config).vocab_size)


def quantization_config(context: RunnerContext, loader: Any, device: torch.device, dtype: torch.dtype,
                        hf_config: Any = None) -> Any:
    """The engine's `QuantizationConfig` for this model and device (None: dense weights); `hf_config`'s
    `quantization_config` (the checkpoint's own scheme) goes to the selector as `QuantSpec.checkpoint_quant`."""
    if context.quantization is None:
        return None
    types = getattr(loader, "weight_types", None)
    hf_quant = getattr(hf_config, "quantization_config", None)
    spec = QuantSpec(device.type, dtype, context.tp.world_size, types(context.config.model) if types else {},
                     checkpoint_quant=_as_dict(hf_quant))
    return context.quantization(spec)


def _as_dict(quant_config: Any) -> dict[str, Any]:
    """A checkpoint's `quantization_config` as a plain dict (transformers may hold a dict or a config object)."""
    if quant_config is None:
        return {}
    if isinstance(quant_config, dict):
        return dict(quant_config)
    to_dict = getattr(quant_config, "to_dict", None)
    return dict(to_dict()) if callable(to_dict) else dict(vars(quant_config))
