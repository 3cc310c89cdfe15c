"""The built-in `lora_manager`: adapters in device slots, every batch mixing them; Triton SGMV shrink/expand
kernels grouped by adapter on CUDA (CUDA-graph safe), per-adapter torch matmuls on CPU (weavelm/lora/)."""

from __future__ import annotations

from weavelm.core.hookspecs import hookimpl
from weavelm.core.interfaces import LoRAManager
from weavelm.lora.manager import LoRAManagerBase, LoRAOptions


class PunicaLoRAManager(LoRAManagerBase, LoRAManager):
    name = "punica"
    description = "Multi-LoRA batching (Punica SGMV kernels grouped by adapter; LRU of device and host adapters)."
    Options = LoRAOptions


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("lora_manager", PunicaLoRAManager.name, PunicaLoRAManager)
