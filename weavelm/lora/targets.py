"""What an adapter may touch in a model, and how a PEFT tensor name finds it.

The runner's manager builds `LoRATargets` from the wrapped model (`weavelm.lora.model.lora_targets`) and reports
it in `model_info`; the engine core checks adapters against it before queueing a request. No architecture's names
are written here: a PEFT tensor `base_model.model.<module path>.lora_A.weight` is renamed with the model's
`WeightsMapper` (`model.layers.0.self_attn.q_proj` -> `layers.0.self_attn.q_proj` for the built-in decoders), and
the model's `packed_modules_mapping` has already named each part of a packed layer (`q_proj` of `qkv_proj`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from weavelm.errors import LoRAError
from weavelm.layers import WeightsMapper

_LORA_KEY = re.compile(r"^(?P<path>.+)\.(?:lora_(?P<ab>[AB])\.weight|lora_embedding_(?P<emb>[AB]))$")
# peft saves the base embedding / head beside their adapters (`save_embedding_layers`), for resized vocabularies
_BASE_COPY = re.compile(r"^(?P<path>.+)\.base_layer\.weight$")


@dataclass(frozen=True)
class LoRATarget:
    """One adaptable module as adapters name it: part `part` (None: the whole layer) of the wrapped layer `module`,
    whose whole-model A is (r, in_features) and B (out_features, r); for an embedding, in = vocab, out = hidden."""

    module: str
    part: int | None
    in_features: int
    out_features: int
    embedding: bool = False


@dataclass(frozen=True)
class LoRATargets:
    """Every adaptable module of a model by name (after `mapper`), whole-model shapes before tensor-parallel
    sharding. `tied_embeddings`: the LM head is the embedding (adapters of it are refused). Picklable."""

    modules: dict[str, LoRATarget]
    mapper: WeightsMapper = field(default_factory=WeightsMapper)
    tied_embeddings: bool = False
    refused: dict[str, str] = field(default_factory=dict)  # module -> why adapters of it (or inside it) are refused

    def refusal(self, target: str) -> str | None:
        """Why the module path `target` may not be adapted, when a module that refuses adapters holds it (one whose
        class sets `lora_unsupported`, e.g. FusedMoE: its experts and router)."""
        for name, why in self.refused.items():
            if target == name or target.startswith(name + "."):
                return f"{target}, part of {name}: {why}"
        return None

    def leaf_names(self) -> list[str]:
        """The last components of the module names (what PEFT's `target_modules` lists), sorted."""
        return sorted({name.rsplit(".", 1)[-1] for name in self.modules})

    def check_target_modules(self, target_modules: object, where: str) -> None:
        """LoRAError when an adapter config's `target_modules` list names modules this model lacks (peft matches
        each entry against the end of a module's name)."""
        if not isinstance(target_modules, (list, tuple)):
            return
        names = list(self.modules)
        unknown = [t for t in target_modules
                   if not any(n == t or n.endswith("." + str(t)) for n in names)]
        if unknown:
            note = f" (note: {next(iter(self.refused.values()))})" if self.refused else ""
            raise LoRAError(f"{where}: target_modules {unknown} are not modules of this model; supported: "
                            f"{', '.join(self.leaf_names())}{note}")

    def parse(self, key: str, where: str) -> tuple[str, str, str] | None:
        """(target name, "A" or "B", module path as the adapter names it) of a PEFT tensor name; None for a saved
        copy of a base embedding (to be checked with `check_base_copy`); LoRAError for anything else."""
        name = key.removeprefix("base_model.model.")
        if _BASE_COPY.match(name):
            return None
        m = _LORA_KEY.match(name)
        if m is None:
            raise LoRAError(f"{where}: tensor {key!r} is not a LoRA weight of a module this model has (supported: "
                            f"{', '.join(self.leaf_names())}; DoRA magnitudes, biases and modules_to_save are not "
                            f"supported)")
        target = self.mapper.map_name(m.group("path"))
        spec = self.modules.get(target)
        if spec is None and self.refusal(target):
            raise LoRAError(f"{where}: tensor {key!r} adapts {self.refusal(target)}")
        if spec is None:
            raise LoRAError(f"{where}: tensor {key!r} targets {target.rsplit('.', 1)[-1]!r}, which this model lacks "
                            f"(no module {target!r}); supported modules: {', '.join(self.leaf_names())}")
        if spec.embedding and self.tied_embeddings:
            raise LoRAError(f"{where}: adapts {target}, but this model ties lm_head to embed_tokens (one weight), so "
                            f"the merged adapter would change both; adapters of tied embeddings are not supported, "
                            f"drop it from target_modules")
        return target, m.group("ab") or m.group("emb"), m.group("path")

    def check_base_copy(self, key: str, tensor: torch.Tensor, where: str) -> None:
        """A saved copy of the base embedding or head is ignored, provided the vocabulary was not resized."""
        want = next(((t.in_features, t.out_features) for t in self.modules.values() if t.embedding), None)
        if tuple(tensor.shape) != want:
            raise LoRAError(f"{where}: {key!r} has shape {tuple(tensor.shape)} but the model's embedding is {want}: "
                            f"the adapter resized the vocabulary, which serving adapters on one base model cannot do")
