"""dummy loader: random weights of the configured shape, for benchmarks. Needs only config.json."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field

from weavelm.core.hookspecs import hookimpl
from weavelm.core.interfaces import ModelArchitecture, ModelLoader


class DummyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    std: float = Field(0.02, gt=0, description="Standard deviation of the random weights.")
    seed: int = Field(0, description="Seed of the random weights.")


class DummyLoader(ModelLoader):
    name = "dummy"
    description = "Random weights of the model's shape (config.json only); for benchmarks."
    Options = DummyOptions

    def iter_weights(self, path: str) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(())

    def checkpoint_num_elements(self, path: str) -> int | None:
        """None: there is no checkpoint (only the memory check applies)."""
        return None

    def load_weights(self, model: ModelArchitecture, path: str) -> None:
        gens: dict[torch.device, torch.Generator] = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                    continue
                gen = gens.get(p.device)
                if gen is None:
                    gen = gens[p.device] = torch.Generator(device=p.device).manual_seed(self.options.seed)
                p.normal_(0.0, self.options.std, generator=gen)


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("loader", DummyLoader.name, DummyLoader)
