"""dummy loader: random weights of the configured shape, for benchmarks. Needs only config.json.

With a quantization method attached, its parameters are filled too: fp8 weights from the same normal draw, integer
codes uniformly, scales (`*scale`, `*scale_inv`) with 1.0."""

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
                if name.endswith(("norm.weight", "scale", "scale_inv")):  # norms; a quantized layer's scales
                    p.fill_(1.0)
                    continue
                gen = gens.get(p.device)
                if gen is None:
                    gen = gens[p.device] = torch.Generator(device=p.device).manual_seed(self.options.seed)
                if not p.dtype.is_floating_point:
                    p.random_(0, 16, generator=gen)  # packed integer codes (int4 / int8 methods)
                elif p.dtype.itemsize == 1:  # fp8 weights: drawn in float32, one slab of rows at a time
                    for rows in torch.split(p, max(1, (1 << 24) // max(1, p[0].numel())), dim=0):
                        rows.copy_(torch.empty(rows.shape, device=p.device).normal_(0.0, self.options.std,
                                                                                  generator=gen))
                else:
                    p.normal_(0.0, self.options.std, generator=gen)


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("loader", DummyLoader.name, DummyLoader)
