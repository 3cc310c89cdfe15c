"""Resolving the configured device (shared by workers and the frontend)."""

from __future__ import annotations

import torch

from weavelm.errors import ConfigError


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when torch sees a GPU, else cpu; `cuda` without a GPU is a ConfigError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError([("device", "cuda was asked for but torch sees no CUDA device; use device: cpu")])
    return torch.device(device)
