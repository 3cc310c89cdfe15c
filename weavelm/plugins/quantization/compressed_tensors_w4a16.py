"""`quantization: ct_w4a16` (picked by `auto`): compressed-tensors `pack-quantized` int4 weight-only checkpoints
(W4A16, as llm-compressor writes them), read through the `compressed-tensors` library's config model.

Claims `quant_method: compressed-tensors` with `format: pack-quantized` only (other formats, e.g. `float-quantized`,
belong to other schemes: `from_checkpoint` returns None). Stored per linear layer (N output, K input features,
G groups):
- `weight_packed` (N, K / 8) int32: input feature 8 r + j in bits [4 j, 4 j + 4) of word r, as q + 8 (signed codes
  -8..7 offset to 0..15; `compressed_tensors...pack_to_int32`): transposed, exactly GPTQ's qweight;
- `weight_scale` (N, G) float; `weight_shape` (2,) int: [N, K];
- asymmetric: `weight_zero_point` (N / 8, G) int32, packed along N the same way; symmetric: the zero point is 0;
- `actorder: group`: `weight_g_idx` (K,) int32, each input feature's group (features sorted by group at load).
w[n, k] = (q - zero_point) * scale. One config group targeting `Linear`, int weights of 4 bits, strategy `group` or
`channel`, no activation quantization; `ignore` may name the LM head only (weavelm's LM head is never quantized).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from weavelm.core.hookspecs import hookimpl
from weavelm.core.interfaces import NoOptions
from weavelm.core.quantization import QuantizationConfig, QuantSpec, layer_kind
from weavelm.errors import LoadError
from weavelm.layers.packed_int4 import (FLOAT, INT, PackedInt4Method, StoredTensor, group_order, how_int4_runs,
                                        select_from_checkpoint, single_rank_reasons)
from weavelm.ops.int4_kernels import Int4Weight, unpack_rows

FORMAT = "pack-quantized"


@dataclass(frozen=True)
class W4A16Settings:
    group_size: int  # -1: per channel
    symmetric: bool
    g_idx: bool


def parse(quant: Mapping) -> W4A16Settings:
    """W4A16Settings from a pack-quantized config, validated by compressed-tensors' own `QuantizationConfig`;
    LoadError naming the field otherwise."""
    from compressed_tensors.quantization import QuantizationConfig as CTConfig
    from pydantic import ValidationError

    quant, reordered = _without_group_actorder(quant)
    try:
        cfg = CTConfig.model_validate(quant)
    except ValidationError as e:
        raise LoadError(f"quantization_config: not a valid compressed-tensors config: {e}") from e
    if len(cfg.config_groups) != 1:
        raise LoadError(f"quantization_config.config_groups: weavelm runs one group (got {len(cfg.config_groups)})")
    (name, scheme), = cfg.config_groups.items()
    where = f"quantization_config.config_groups.{name}"
    if "Linear" not in (scheme.targets or []):
        raise LoadError(f"{where}.targets: {scheme.targets!r}; weavelm's ct_w4a16 runs a group targeting 'Linear'")
    w = scheme.weights
    if w is None or w.num_bits != 4 or str(getattr(w.type, "value", w.type)) != "int":
        got = "none" if w is None else f"num_bits: {w.num_bits}, type: {getattr(w.type, 'value', w.type)}"
        raise LoadError(f"{where}.weights: {got}; weavelm's ct_w4a16 runs 4-bit int weights")
    if scheme.input_activations is not None:
        raise LoadError(f"{where}.input_activations: activation quantization (W4A8) is not supported; "
                        f"weavelm's ct_w4a16 runs 16-bit activations")
    strategy = str(getattr(w.strategy, "value", w.strategy))
    if strategy not in ("group", "channel"):
        raise LoadError(f"{where}.weights.strategy: {strategy!r}; supported: 'group', 'channel'")
    extra = [m for m in cfg.ignore or [] if not str(m).endswith("lm_head")]
    if extra:
        raise LoadError(f"quantization_config.ignore: {extra!r}; weavelm's ct_w4a16 can leave only the LM head "
                        f"unquantized")
    return W4A16Settings(w.group_size if strategy == "group" else -1, bool(w.symmetric), reordered)


def _without_group_actorder(quant: Mapping) -> tuple[dict, bool]:
    """The config with `actorder: group` (or its alias `dynamic`) taken out of every weights section, and whether
    one was there. Checkpoints made by earlier llm-compressor releases store it (with `weight_g_idx`); the
    compressed-tensors library now refuses to parse it, but the stored layout is still well defined."""
    quant = copy.deepcopy(dict(quant))
    found = False
    for scheme in (quant.get("config_groups") or {}).values():
        weights = scheme.get("weights") if isinstance(scheme, dict) else None
        if isinstance(weights, dict) and weights.get("actorder") in ("group", "dynamic"):
            weights["actorder"] = None
            found = True
    return quant, found


class W4A16LinearMethod(PackedInt4Method):
    fmt = "ct-w4a16"

    def __init__(self, settings: W4A16Settings, prefix: str = ""):
        super().__init__(settings.group_size, prefix)
        self.settings = settings

    def stored(self) -> Mapping[str, StoredTensor]:
        out = {"weight_packed": StoredTensor(lambda n, k, g: (n, k // 8), 0, INT, torch.int32),
               "weight_scale": StoredTensor(lambda n, k, g: (n, g), 0, FLOAT, torch.float32),
               "weight_shape": StoredTensor(lambda n, k, g: (2,), "part", (torch.int64, torch.int32), torch.int64)}
        if not self.settings.symmetric:
            out["weight_zero_point"] = StoredTensor(lambda n, k, g: (n // 8, g), 0, INT, torch.int32, out_div=8)
        if self.settings.g_idx:
            out["weight_g_idx"] = StoredTensor(lambda n, k, g: (k,), None, INT, torch.int32)
        return out

    def to_int4(self, tensors: Mapping[str, torch.Tensor], parts: list[int], k: int) -> Int4Weight:
        shapes = [tuple(r) for r in tensors["weight_shape"].tolist()]
        if shapes != [(n, k) for n in parts]:
            raise LoadError(f"tensor {self.prefix}.weight_shape: {shapes} does not match the layer's "
                            f"{[(n, k) for n in parts]} (output x input features per part)")
        scales = tensors["weight_scale"].t().contiguous()
        if self.settings.symmetric:
            zeros = torch.full_like(scales, 8.0)
        else:
            zeros = unpack_rows(tensors["weight_zero_point"]).t().float()
        size = k if self.group_size == -1 else self.group_size
        qweight = tensors["weight_packed"].t().contiguous()
        perm = None
        if self.settings.g_idx:
            perm = group_order(tensors["weight_g_idx"].cpu(), self.group_size, scales.shape[0],
                               f"tensor {self.prefix}.weight_g_idx")
        if perm is None:
            return Int4Weight(qweight, scales, zeros, size)
        perm = perm.to(qweight.device)
        return Int4Weight.from_codes(unpack_rows(qweight).index_select(0, perm), scales, zeros, size, perm)


class W4A16Config(QuantizationConfig):
    name = "ct_w4a16"
    description = "compressed-tensors pack-quantized int4 weight-only checkpoints (W4A16)."
    Options = NoOptions

    def __init__(self, options=None, settings: W4A16Settings | None = None):
        super().__init__(options or NoOptions())
        self.settings = settings

    @classmethod
    def from_checkpoint(cls, spec: QuantSpec) -> W4A16Config | None:
        quant = spec.checkpoint_quant
        if quant.get("quant_method") != "compressed-tensors" or quant.get("format") != FORMAT:
            return None
        return cls(settings=parse(quant))

    @classmethod
    def select(cls, options, spec: QuantSpec, candidates) -> W4A16Config:
        return select_from_checkpoint(cls, spec, "a compressed-tensors pack-quantized checkpoint")

    @classmethod
    def how_it_runs(cls, device: str) -> str:
        return how_int4_runs(device)

    @classmethod
    def check(cls, spec: QuantSpec) -> list[str]:
        return single_rank_reasons(spec, "ct_w4a16")

    def get_quant_method(self, layer, prefix):
        return W4A16LinearMethod(self.settings, prefix) if layer_kind(layer) == "linear" else None


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("quantization", W4A16Config.name, W4A16Config)
