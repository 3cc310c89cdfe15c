"""`quantization: gptq` (picked by `auto` from `quant_method: gptq`): GPTQ int4 checkpoints (AutoGPTQ / GPTQModel).

Stored per linear layer (K input, N output features, G = K / group_size groups, or 1 with group_size -1):
- `qweight` (K / 8, N) int32: input feature 8 r + j of output n in bits [4 j, 4 j + 4) of qweight[r, n];
- `qzeros` (G, N / 8) int32: zero point of output 8 c + j in bits [4 j, 4 j + 4) of qzeros[g, c]. With
  `checkpoint_format: gptq` (v1, the default and what GPTQModel saves) the stored value is zero - 1 (GPTQModel's
  `convert_gptq_v1_to_v2_format` adds 0x11111111 to each int32 word to undo it); `gptq_v2` stores the zero itself;
- `scales` (G, N) float16;
- `g_idx` (K,) int32: the group of each input feature. With `desc_act` (act-order) the groups are scattered over K;
  the features are then sorted by group once at load and activations gathered per call.
w[n, k] = (q[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]. `sym` only changes what the zeros hold (8); both are
read from `qzeros`. Only `bits: 4`; the kernels are `weavelm.ops.int4_kernels`'.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from weavelm.core.hookspecs import hookimpl
from weavelm.core.interfaces import NoOptions
from weavelm.core.quantization import QuantizationConfig, QuantSpec, layer_kind
from weavelm.errors import LoadError
from weavelm.layers.packed_int4 import (FLOAT, INT, PackedInt4Method, StoredTensor, config_field, group_order,
                                        how_int4_runs, int4_group_size, select_from_checkpoint, single_rank_reasons)
from weavelm.ops.int4_kernels import Int4Weight, unpack_rows

V1_ZERO_OFFSET = 0x11111111  # one per nibble: v1 stores zero - 1 in every 4-bit field


@dataclass(frozen=True)
class GPTQSettings:
    """The checkpoint's `quantization_config` as weavelm runs it."""

    group_size: int
    desc_act: bool
    sym: bool
    zero_offset: bool  # checkpoint_format "gptq" (v1): stored zeros are zero - 1


def parse(quant: Mapping) -> GPTQSettings:
    """GPTQSettings from a `quant_method: gptq` config; LoadError naming the field otherwise."""
    bits = config_field(quant, "bits", "gptq", int)
    if bits != 4:
        raise LoadError(f"quantization_config.bits: {bits}-bit GPTQ is not supported; weavelm runs bits: 4")
    fmt = config_field(quant, "checkpoint_format", "gptq", str, default="gptq", allowed=("gptq", "gptq_v2"),
                       aliases=("format",))
    config_field(quant, "pack_dtype", "gptq", str, default="int32", allowed=("int32",))
    if config_field(quant, "lm_head", "gptq", bool, default=False):
        raise LoadError("quantization_config.lm_head: a quantized LM head is not supported by weavelm's gptq scheme")
    if config_field(quant, "dynamic", "gptq", (dict, type(None)), default=None):
        raise LoadError("quantization_config.dynamic: per-module GPTQ overrides are not supported")
    return GPTQSettings(int4_group_size(quant, "gptq"), config_field(quant, "desc_act", "gptq", bool, default=False),
                        config_field(quant, "sym", "gptq", bool, default=True), fmt == "gptq")


class GPTQLinearMethod(PackedInt4Method):
    fmt = "gptq"

    def __init__(self, settings: GPTQSettings, prefix: str = ""):
        super().__init__(settings.group_size, prefix)
        self.settings = settings

    def stored(self) -> Mapping[str, StoredTensor]:
        return {"qweight": StoredTensor(lambda n, k, g: (k // 8, n), 1, INT, torch.int32),
                "qzeros": StoredTensor(lambda n, k, g: (g, n // 8), 1, INT, torch.int32, out_div=8),
                "scales": StoredTensor(lambda n, k, g: (g, n), 1, FLOAT, torch.float32),
                "g_idx": StoredTensor(lambda n, k, g: (k,), None, INT, torch.int32)}

    def to_int4(self, tensors: Mapping[str, torch.Tensor], parts: list[int], k: int) -> Int4Weight:
        qzeros = tensors["qzeros"]
        if self.settings.zero_offset:
            qzeros = add_per_word(qzeros, V1_ZERO_OFFSET)
        zeros = unpack_rows(qzeros.t().contiguous()).t().float()
        groups, size = zeros.shape[0], k if self.group_size == -1 else self.group_size
        perm = group_order(tensors["g_idx"].cpu(), self.group_size, groups, f"tensor {self.prefix}.g_idx")
        if perm is None:
            return Int4Weight(tensors["qweight"].contiguous(), tensors["scales"], zeros, size)
        perm = perm.to(qzeros.device)
        codes = unpack_rows(tensors["qweight"]).index_select(0, perm)
        return Int4Weight.from_codes(codes, tensors["scales"], zeros, size, perm)


def add_per_word(words: torch.Tensor, value: int) -> torch.Tensor:
    """int32 words + value, wrapping at 32 bits (as the int32 addition GPTQModel does)."""
    out = (words.to(torch.int64) + value) & 0xFFFFFFFF
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)


class GPTQConfig(QuantizationConfig):
    name = "gptq"
    description = "GPTQ int4 checkpoints (quant_method: gptq; group size, desc_act/g_idx, sym or asym)."
    Options = NoOptions

    def __init__(self, options=None, settings: GPTQSettings | None = None):
        super().__init__(options or NoOptions())
        self.settings = settings

    @classmethod
    def from_checkpoint(cls, spec: QuantSpec) -> GPTQConfig | None:
        if spec.checkpoint_quant.get("quant_method") != "gptq":
            return None
        return cls(settings=parse(spec.checkpoint_quant))

    @classmethod
    def select(cls, options, spec: QuantSpec, candidates) -> GPTQConfig:
        return select_from_checkpoint(cls, spec, "a GPTQ checkpoint (config.json quantization_config.quant_method: "
                                                 "gptq)")

    @classmethod
    def how_it_runs(cls, device: str) -> str:
        return how_int4_runs(device)

    @classmethod
    def check(cls, spec: QuantSpec) -> list[str]:
        return single_rank_reasons(spec, "gptq")

    def get_quant_method(self, layer, prefix):
        return GPTQLinearMethod(self.settings, prefix) if layer_kind(layer) == "linear" else None


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("quantization", GPTQConfig.name, GPTQConfig)
