"""The `auto` loader: picks the loader from what is on disk and says which it picked.

Every registered loader's `detect(path)` is asked in order (built-in formats first: safetensors, pt, tensorizer,
gguf; then any third-party loader), so a plugin format is picked up without changes here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from weavelm.core.hookspecs import hookimpl
from weavelm.core.interfaces import ModelArchitecture, ModelLoader
from weavelm.errors import LoadError

logger = logging.getLogger("weavelm.loaders")
PREFERENCE = ("safetensors", "pt", "tensorizer", "gguf")
NOT_CANDIDATES = ("auto", "dummy")


def choose_loader(path: str, candidates: Mapping[str, type[ModelLoader]]) -> tuple[str, str]:
    """`(loader name, reason)` for `path` among `candidates`, or LoadError listing the formats looked for."""
    names = sorted(candidates)
    ordered = [n for n in PREFERENCE if n in names] + [n for n in names if n not in PREFERENCE]
    ordered = [n for n in ordered if n not in NOT_CANDIDATES]
    for name in ordered:
        reason = candidates[name].detect(path)
        if reason:
            return name, reason
    raise LoadError(f"model: no loader recognises {path!r} (tried {', '.join(ordered)}); give a directory with "
                    f"config.json and weights, a .gguf file, or set `loader:` explicitly")


class AutoLoader(ModelLoader):
    name = "auto"
    description = "Picks safetensors, pt, tensorizer, gguf (or a plugin format) from the files on disk."

    def __init__(self, options: Any, candidates: Mapping[str, type[ModelLoader]] | None = None):
        super().__init__(options)
        self.candidates = dict(candidates or {})
        self._chosen: dict[str, ModelLoader] = {}
        self.picked: dict[str, tuple[str, str]] = {}

    @classmethod
    def select(cls, options: Any, candidates: Mapping[str, type[ModelLoader]]) -> ModelLoader:
        return cls(options, candidates)

    @classmethod
    def detect(cls, path: str) -> str | None:
        return None

    def resolve(self, path: str) -> ModelLoader:
        """The loader `auto` delegates to for `path` (chosen once per path and logged)."""
        if path not in self._chosen:
            name, reason = choose_loader(path, self.candidates)
            cls = self.candidates[name]
            self._chosen[path] = cls.select(cls.Options(), self.candidates)
            self.picked[path] = (name, reason)
            logger.info("loader auto: picked %r for %s (%s)", name, path, reason)
        return self._chosen[path]

    def load_hf_config(self, path: str) -> Any:
        return self.resolve(path).load_hf_config(path)

    def load_tokenizer(self, path: str) -> Any | None:
        return self.resolve(path).load_tokenizer(path)

    def iter_weights(self, path: str) -> Iterator[tuple[str, torch.Tensor]]:
        return self.resolve(path).iter_weights(path)

    def checkpoint_num_elements(self, path: str) -> int | None:
        """The chosen loader's count (None when that loader cannot tell)."""
        counter = getattr(self.resolve(path), "checkpoint_num_elements", None)
        return counter(path) if counter is not None else None

    def weight_types(self, path: str) -> dict[str, str]:
        return self.resolve(path).weight_types(path)

    def check_checkpoint(self, model: ModelArchitecture, path: str) -> None:
        """The chosen loader's up-front check (`FileLoader.check_checkpoint`), where it has one."""
        check = getattr(self.resolve(path), "check_checkpoint", None)
        if check is not None:
            check(model, path)

    def load_weights(self, model: ModelArchitecture, path: str) -> None:
        self.resolve(path).load_weights(model, path)


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("loader", AutoLoader.name, AutoLoader)
