"""Helpers shared by loaders: reading config.json, checking that weights fill the model exactly."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch

from weavelm.errors import LoadError


def load_hf_config(path: str) -> Any:
    """The transformers config of a model directory, with a LoadError that says what to do when it is missing."""
    from transformers import AutoConfig

    if not os.path.isdir(path):
        raise LoadError(f"model: {path!r} is not a directory; give a directory with config.json and weights "
                        f"(or a .gguf file with loader: gguf)")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise LoadError(f"model: {path!r} has no config.json; save the model with transformers' save_pretrained "
                        f"or point `model` at the directory that holds config.json")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a bad config
        raise LoadError(f"{cfg_file}: cannot be read as a transformers config ({e})") from e


def load_into_model(model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Stream `weights` into `model.load_weights` and check that every parameter was filled.

    Raises LoadError naming the file and the tensors that are missing, unexpected or mis-shaped.
    """
    try:
        loaded = model.load_weights(weights)
    except LoadError:
        raise
    except (KeyError, ValueError, RuntimeError) as e:
        raise LoadError(f"{source}: {e}") from e
    expected = {n for n, _ in model.named_parameters()}
    missing = sorted(expected - set(loaded))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise LoadError(f"{source}: missing tensor(s) for parameter(s) {shown}; the checkpoint is incomplete or "
                        f"for a different architecture")
