"""The `pt` loader: PyTorch pickles (`pytorch_model.bin`, `*.pt`), single or sharded
(`pytorch_model.bin.index.json`).

Always `torch.load(..., weights_only=True, mmap=True)`: the restricted unpickler accepts tensors and plain
containers only, so a pickle that would run code is refused before anything runs, and the memory map keeps a shard's
tensors on disk until the model copies them. A tensor-parallel rank narrows each mapped tensor to its shard, so only
that shard's pages are read.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterator

import torch

from weavelm.core.hookspecs import hookimpl
from weavelm.errors import LoadError
from weavelm.plugins.loaders.common import IGNORED_SUFFIXES, FileLoader, WeightRecord, weight_files

INDEX = "pytorch_model.bin.index.json"
SUFFIXES = (".bin", ".pt", ".pth")


def load_state_dict(file: str) -> dict[str, torch.Tensor]:
    """The state dict in `file`, unpickled with torch's weights-only unpickler; LoadError on anything else."""
    if not zipfile.is_zipfile(file):
        raise LoadError(f"{file}: not a PyTorch zip archive (truncated, corrupt, or the legacy pre-1.6 format that "
                        f"cannot be memory-mapped); re-save it with torch.save or convert the model")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        reason = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0])
        raise LoadError(f"{file}: refused to unpickle: the file holds objects other than tensors ({reason}); nothing "
                        f"from it was executed. Only plain state dicts of tensors are loaded") from e
    except Exception as e:  # torch raises RuntimeError / zipfile / EOF errors for corrupt archives
        raise LoadError(f"{file}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e}); the file is "
                        f"truncated or corrupt") from e
    if isinstance(obj, dict) and set(obj) == {"state_dict"} and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise LoadError(f"{file}: holds a {type(obj).__name__}, not a state dict of tensors")
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise LoadError(f"{file}: entry {name!r} is a {type(value).__name__}, not a tensor; save the model's "
                            f"state_dict() only")
    return obj


class PtLoader(FileLoader):
    name = "pt"
    description = "PyTorch .bin/.pt state dicts, single or sharded; weights_only + mmap, never runs pickled code."

    @classmethod
    def detect(cls, path: str) -> str | None:
        if os.path.isfile(path):
            return f"a {os.path.splitext(path)[1]} file" if path.endswith(SUFFIXES) else None
        if os.path.isfile(os.path.join(path, INDEX)):
            return f"{INDEX} (sharded PyTorch)"
        if os.path.isdir(path) and any(f.endswith(SUFFIXES) for f in os.listdir(path)):
            return "PyTorch .bin/.pt files"
        return None

    def checkpoint_num_elements(self, path: str) -> int | None:
        """Elements (product of the logical shape) summed over the checkpoint's tensors at `path`, read from
        memory-mapped state dicts without loading tensor data; rotary `inv_freq` buffers are not counted."""
        files = weight_files(path, single=("pytorch_model.bin", "model.pt"), index=INDEX, suffixes=SUFFIXES,
                             fmt="PyTorch")
        total = 0
        for file in files:
            state = load_state_dict(file)
            total += sum(t.numel() for name, t in state.items() if not name.endswith(IGNORED_SUFFIXES))
            del state
        return total

    def iter_sourced(self, path: str) -> Iterator[WeightRecord]:
        files = weight_files(path, single=("pytorch_model.bin", "model.pt"), index=INDEX, suffixes=SUFFIXES,
                             fmt="PyTorch")
        for file in files:
            state = load_state_dict(file)
            for name in list(state):
                yield file, name, state.pop(name)
            del state


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("loader", PtLoader.name, PtLoader)
