"""Helpers shared by loaders: reading config.json, checking that weights fill the model exactly, and the lazy
checkpoint tensor through which a tensor-parallel rank reads only its shard."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable
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
        cfg = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a bad config
        raise LoadError(f"{cfg_file}: cannot be read as a transformers config ({e})") from e
    check_rope_parameters(cfg, cfg_file)
    return cfg


# rope-scaling numbers real checkpoints carry, and the least each may be (transformers only warns about these)
ROPE_MINIMUM = {"factor": (1.0, True), "rope_theta": (0.0, False), "original_max_position_embeddings": (1.0, True),
                "low_freq_factor": (0.0, False), "high_freq_factor": (0.0, False), "beta_fast": (0.0, False),
                "beta_slow": (0.0, False), "attention_factor": (0.0, False)}  # name -> (bound, bound allowed)


def check_rope_parameters(cfg: Any, source: str) -> None:
    """Refuse rope-scaling values no model can run with (`factor: -1`, a NaN theta): a LoadError naming the key,
    the value and the bound, instead of positions that silently go wrong."""
    for attr in ("rope_scaling", "rope_parameters"):
        params = getattr(cfg, attr, None)
        if not isinstance(params, dict):
            continue
        for key, (bound, inclusive) in ROPE_MINIMUM.items():
            if key not in params or params[key] is None:
                continue
            value = params[key]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
                (value >= bound if inclusive else value > bound)
            if not ok:
                need = f">= {bound:g}" if inclusive else f"> {bound:g}"
                raise LoadError(f"{source}: {attr}.{key} must be a finite number {need} (got {value!r}); fix the "
                                f"model's config.json")


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


ShardReader = Callable[[int | None, int, int], torch.Tensor]
"""`read(dim, start, length)`: the slice `start:start + length` along `dim` as a fresh tensor; dim None: all of it."""


class LazyTensor:
    """A checkpoint tensor whose data stays on disk until asked for: whole (`materialize`) or one slice along one
    dimension (`narrow`), so a tensor-parallel rank reads only its shard. `shape` and `dtype` are the stored
    tensor's. Loaders yield these where the format allows (safetensors, GGUF); model weight loaders take any
    tensor through `narrow_or_slice` and `materialize`, which also accept plain tensors."""

    __slots__ = ("shape", "dtype", "_read")

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, read: ShardReader):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self._read = read

    def dim(self) -> int:
        return len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        dim = dim % len(self.shape)
        if not 0 <= start <= start + length <= self.shape[dim]:
            raise ValueError(f"slice {start}:{start + length} of dimension {dim} is outside shape {tuple(self.shape)}")
        if start == 0 and length == self.shape[dim]:
            return self.materialize()
        return self._read(dim, start, length)

    def materialize(self) -> torch.Tensor:
        return self._read(None, 0, 0)

    def __repr__(self) -> str:
        return f"LazyTensor(shape={tuple(self.shape)}, dtype={self.dtype})"


def narrow_or_slice(t: torch.Tensor | LazyTensor, dim: int, start: int, length: int) -> torch.Tensor:
    """`t.narrow(dim, start, length)` for a tensor (a view: an mmap'd tensor touches only the shard's pages); for a
    LazyTensor, only that slice is read."""
    return t.narrow(dim, start, length)


def materialize(t: torch.Tensor | LazyTensor) -> torch.Tensor:
    """The whole tensor (a LazyTensor is read; a tensor is returned as is)."""
    return t.materialize() if isinstance(t, LazyTensor) else t



HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(model: str | None) -> str:
    """The local path of `model`: None -> the default model; an existing path as given (an empty folder is an
    error); an id such as `HuggingFaceTB/SmolLM2-135M-Instruct` -> its snapshot in the local Hugging Face cache.
    weavelm never downloads: a hub id missing from the cache is a LoadError saying so."""
    if model is None:
        from weavelm.default_model import default_model_path
        return default_model_path()
    if os.path.isdir(model):
        if not os.listdir(model):
            raise LoadError(f"model: {model!r} is an empty folder; put config.json and the weights there or point "
                            f"`model` at the folder that holds them")
        return model
    if os.path.exists(model):
        return model
    if HUB_ID.match(model) and not model.startswith("."):
        local = _hub_snapshot(model)
        if local is not None:
            return local
        raise LoadError(f"model: {model!r} is not a local path and not in the local Hugging Face cache "
                        f"({_hub_cache_dir()}); weavelm never downloads. Fetch it once with "
                        f"`huggingface-cli download {model}` or pass a model directory")
    raise LoadError(f"model: {model!r} does not exist; give a model directory (config.json + weights), a .gguf "
                    f"file, or a Hugging Face id already in the local cache")


def _hub_snapshot(repo_id: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # LocalEntryNotFoundError, an invalid id, ...
        return None


def _hub_cache_dir() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
        return HF_HUB_CACHE
    except ImportError:
        return "~/.cache/huggingface/hub"
