"""`quantization: awq` (picked by `auto` from `quant_method: awq`): AutoAWQ int4 checkpoints, GEMM layout.

Stored per linear layer (K input, N output features, G = K / group_size groups):
- `qweight` (K, N / 8) int32 and `qzeros` (G, N / 8) int32, packed along the OUTPUT features in AWQ's interleaved
  order: nibble i (bits [4 i, 4 i + 4)) of word c holds output 8 c + [0, 2, 4, 6, 1, 3, 5, 7][i];
- `scales` (G, N) float16.
w[n, k] = (q[k, n] - zero[k // group_size, n]) * scales[k // group_size, n] (zeros stored as they are). Only
`version: gemm`, `zero_point: true`, 4 bits; repacked once into GPTQ's layout for `weavelm.ops.int4_kernels`.
Modules named in `modules_to_not_convert` (matched as substrings of weavelm's module names) stay dense.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from weavelm.core.hookspecs import hookimpl
from weavelm.core.interfaces import NoOptions
from weavelm.core.quantization import QuantizationConfig, QuantSpec, layer_kind
from weavelm.errors import LoadError
from weavelm.layers.packed_int4 import (FLOAT, INT, PackedInt4Method, StoredTensor, config_field, how_int4_runs,
                                        int4_group_size, select_from_checkpoint, single_rank_reasons)
from weavelm.ops.int4_kernels import Int4Weight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds output 8 c + AWQ_ORDER[i]
AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)  # output 8 c + j sits in nibble AWQ_REVERSE[j]


@dataclass(frozen=True)
class AWQSettings:
    group_size: int
    not_converted: tuple[str, ...] = ()


def parse(quant: Mapping) -> AWQSettings:
    """AWQSettings from a `quant_method: awq` config; LoadError naming the field otherwise."""
    bits = config_field(quant, "bits", "awq", int, aliases=("w_bit",))
    if bits != 4:
        raise LoadError(f"quantization_config.bits: {bits}-bit AWQ is not supported; weavelm runs bits: 4")
    version = config_field(quant, "version", "awq", str, default="gemm")
    if version.lower() != "gemm":
        raise LoadError(f"quantization_config.version: {version!r} is not supported by weavelm's awq scheme; "
                        f"supported: 'gemm'")
    if not config_field(quant, "zero_point", "awq", bool, default=True):
        raise LoadError("quantization_config.zero_point: false is not supported by weavelm's awq scheme")
    skip = config_field(quant, "modules_to_not_convert", "awq", (list, type(None)), default=None) or []
    return AWQSettings(int4_group_size(quant, "awq", aliases=("q_group_size",)), tuple(map(str, skip)))


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """(R, C) int32 in AWQ's order -> (R, 8 C) codes 0..15 in natural output order."""
    shifts = torch.tensor([4 * i for i in AWQ_REVERSE], dtype=torch.int32, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 0xF).reshape(packed.shape[0], -1).to(torch.uint8)


class AWQLinearMethod(PackedInt4Method):
    fmt = "awq"

    def stored(self) -> Mapping[str, StoredTensor]:
        return {"qweight": StoredTensor(lambda n, k, g: (k, n // 8), 1, INT, torch.int32, out_div=8),
                "qzeros": StoredTensor(lambda n, k, g: (g, n // 8), 1, INT, torch.int32, out_div=8),
                "scales": StoredTensor(lambda n, k, g: (g, n), 1, FLOAT, torch.float32)}

    def to_int4(self, tensors: Mapping[str, torch.Tensor], parts: list[int], k: int) -> Int4Weight:
        size = k if self.group_size == -1 else self.group_size
        return Int4Weight.from_codes(unpack_awq(tensors["qweight"]), tensors["scales"],
                                     unpack_awq(tensors["qzeros"]).float(), size)


class AWQConfig(QuantizationConfig):
    name = "awq"
    description = "AWQ int4 checkpoints (quant_method: awq, version gemm)."
    Options = NoOptions

    def __init__(self, options=None, settings: AWQSettings | None = None):
        super().__init__(options or NoOptions())
        self.settings = settings

    @classmethod
    def from_checkpoint(cls, spec: QuantSpec) -> AWQConfig | None:
        if spec.checkpoint_quant.get("quant_method") != "awq":
            return None
        return cls(settings=parse(spec.checkpoint_quant))

    @classmethod
    def select(cls, options, spec: QuantSpec, candidates) -> AWQConfig:
        return select_from_checkpoint(cls, spec, "an AWQ checkpoint (quantization_config.quant_method: awq)")

    @classmethod
    def how_it_runs(cls, device: str) -> str:
        return how_int4_runs(device)

    @classmethod
    def check(cls, spec: QuantSpec) -> list[str]:
        return single_rank_reasons(spec, "awq")

    def get_quant_method(self, layer, prefix):
        if layer_kind(layer) != "linear" or any(s in prefix for s in self.settings.not_converted):
            return None
        return AWQLinearMethod(self.settings.group_size, prefix)


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("quantization", AWQConfig.name, AWQConfig)
