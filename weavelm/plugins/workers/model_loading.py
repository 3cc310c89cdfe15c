"""Building the model from the config: loader, architecture, dtype, device; and choosing the attention backend."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

from weavelm.core.config import AUTO_ATTENTION, EngineConfig
from weavelm.core.forward import AttentionSpec
from weavelm.core.interfaces import AttentionBackend
from weavelm.core.registry import get_registry
from weavelm.errors import ConfigError, PluginError

logger = logging.getLogger("weavelm.loading")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
AUTO_ATTENTION_ORDER = ("flash_attn", "triton", "torch_ref")


def resolve_device(config: EngineConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError([("device", "cuda was asked for but torch sees no CUDA device; use device: cpu")])
    return torch.device(config.device)


def resolve_dtype(config: EngineConfig, hf_config: Any, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return DTYPES[config.dtype]
    if device.type == "cpu":
        return torch.float32
    ckpt = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
    ckpt = DTYPES.get(str(ckpt).removeprefix("torch."), None) if ckpt is not None else None
    return ckpt if ckpt in (torch.float16, torch.bfloat16) else torch.bfloat16


def model_max_len(config: EngineConfig, hf_config: Any) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None) or 4096
    if config.max_model_len is None:
        return int(limit)
    if config.max_model_len > limit:
        raise ConfigError([("max_model_len", f"{config.max_model_len} exceeds the model's context of {limit}; "
                                             f"set max_model_len <= {limit}")])
    return config.max_model_len


def make_loader(config: EngineConfig, registry=None):
    registry = registry or get_registry()
    return registry.get("loader", config.loader.name)(config.loader.options)


@dataclass
class ModelBundle:
    model: Any
    hf_config: Any
    dtype: torch.dtype
    max_model_len: int
    vocab_size: int


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model_bundle(config: EngineConfig, device: torch.device) -> ModelBundle:
    registry = get_registry()
    if not config.model:
        raise ConfigError([("model", "no model given; set `model:` to a model directory or .gguf file")])
    loader = make_loader(config, registry)
    hf_config = loader.load_hf_config(config.model)
    archs = getattr(hf_config, "architectures", None) or []
    if not archs:
        raise ConfigError([("model", f"{config.model}: config.json names no `architectures`")])
    model_cls = registry.find_model(archs[0])
    dtype = resolve_dtype(config, hf_config, device)
    with _default_dtype(dtype), torch.device(device):
        model = model_cls(hf_config)
    loader.load_weights(model, config.model)
    model.eval()
    return ModelBundle(model, hf_config, dtype, model_max_len(config, hf_config), hf_config.vocab_size)


def select_attention(config: EngineConfig, spec: AttentionSpec, registry) -> AttentionBackend:
    """The configured backend, or for `auto` the first of flash_attn > triton > torch_ref whose check() passes."""
    name = config.attention.name
    if name != AUTO_ATTENTION:
        cls = registry.get("attention", name)
        reasons = cls.check(spec)
        if reasons:
            raise PluginError(f"attention backend {name!r} cannot run here: {'; '.join(reasons)}; "
                              f"choose another with attention: <name> (installed: "
                              f"{', '.join(registry.names('attention'))})")
        return cls(config.attention.options)
    order = AUTO_ATTENTION_ORDER if spec.device == "cuda" else ("torch_ref",)
    skipped = []
    for candidate in order:
        try:
            cls = registry.get("attention", candidate)
        except PluginError as e:
            skipped.append(f"{candidate}: {e}")
            continue
        reasons = cls.check(spec)
        if not reasons:
            logger.info("attention: auto picked %s%s", candidate, f" (skipped {skipped})" if skipped else "")
            return cls(cls.Options())
        skipped.append(f"{candidate}: {'; '.join(reasons)}")
    raise PluginError("attention: auto found no backend that can run: " + " | ".join(skipped))
