"""The quantization method shared by the int4 checkpoint formats (GPTQ, AWQ, compressed-tensors W4A16).

A format names the tensors each quantized linear layer stores (`StoredTensor`, e.g. GPTQ's `qweight`, `qzeros`,
`scales`, `g_idx`) and how they become `weavelm.ops.int4_kernels.Int4Weight` (`to_int4`). `PackedInt4Method` does the
rest, in vLLM's three steps:
1. `create_weights`: drop the layer's dense `weight` (the checkpoint has none) and register one parameter per stored
   tensor, sized for the whole layer, whose `weight_loader` checks each checkpoint part's shape and dtype (a
   ValueError, which the loading code turns into a LoadError naming the tensor) and copies it into place; the parts
   of a packed layer (q/k/v, gate/up) stack along their output dimension, as the dense weights do;
   `checkpoint_tensors` declares the same tensors to the loaders' schema check (shape per checkpoint module, dtype
   where only one is accepted). The dense weight's device is where they are created (`meta` when the model is built
   without allocating); they are repacked wherever they were loaded;
2. the checkpoint streams in through those loaders (`weavelm.layers.weights.load_checkpoint` finds them by name);
3. `process_weights_after_loading`: `to_int4`, then `Int4Linear.prepare` picks the kernel for the device and dtype
   and the stored parameters are freed.
Single-rank only (the configs' `check` says so for tensor parallelism).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from weavelm.core.model_files import materialize
from weavelm.core.quantization import CheckpointTensor, QuantizeMethodBase
from weavelm.errors import LoadError
from weavelm.ops.int4_kernels import Int4Linear, Int4Weight, int4_linear

INT = (torch.int32,)
FLOAT = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class StoredTensor:
    """One tensor a quantized layer stores, by its name's last part.

    shape(n, k, groups): its shape for a part of n output features and k input features.
    out_dim: the dimension holding output features, along which a packed layer's parts stack; None: one value shared
    by every part (e.g. `g_idx`, which must then agree); "part": one row per part (compressed-tensors' `weight_shape`).
    out_div: output features per element along `out_dim` (8 when eight 4-bit values share an int32).
    dtypes: the stored dtypes accepted; keep: the parameter's dtype.
    """

    shape: Callable[[int, int, int], tuple[int, ...]]
    out_dim: int | str | None
    dtypes: tuple[torch.dtype, ...]
    keep: torch.dtype
    out_div: int = 1


DeclaredTensor = CheckpointTensor  # the stored tensors as the loaders' schema check expects them


def layer_parts(layer: nn.Module) -> tuple[list[int], int]:
    """(output features of each checkpoint part, input features) of a single-rank linear layer."""
    segments = getattr(layer, "output_segments", None)
    if segments is not None:
        return [s.whole for s in segments()], layer.in_features
    return [layer.out_features], layer.in_per_rank * layer.tp.world_size


class PackedInt4Method(QuantizeMethodBase):
    """One int4 layer of a format; subclasses set `fmt` and `stored` and implement `to_int4`."""

    fmt: str = "int4"

    def __init__(self, group_size: int, prefix: str = ""):
        self.group_size = group_size  # -1: one group over all input features
        self.prefix = prefix  # the layer's module name, for error messages
        self.kind = self.fmt

    @abstractmethod
    def stored(self) -> Mapping[str, StoredTensor]:
        """The tensors a layer of this format stores, by name suffix."""

    @abstractmethod
    def to_int4(self, tensors: Mapping[str, torch.Tensor], parts: list[int], k: int) -> Int4Weight:
        """The loaded tensors (whole layer, parts stacked) as an `Int4Weight`; LoadError for inconsistent values."""

    def groups(self, k: int) -> int:
        return 1 if self.group_size == -1 else k // self.group_size

    def create_weights(self, layer: nn.Module) -> None:
        parts, k = layer_parts(layer)
        if self.group_size != -1 and k % self.group_size:
            raise LoadError(f"{self.fmt}: group_size {self.group_size} does not divide the {k} input features of "
                            f"{self.prefix or type(layer).__name__}")
        if any(n % 8 for n in parts):
            raise LoadError(f"{self.fmt}: output features {parts} of {self.prefix or type(layer).__name__} are not "
                            f"multiples of 8 (int4 packing)")
        self.dtype = layer.weight.dtype  # the activation dtype; the device is the dense weight's (meta while built)
        device = layer.weight.device
        layer.register_parameter("weight", None)
        groups = self.groups(k)
        for name, spec in self.stored().items():
            if spec.out_dim == "part":
                shape = (len(parts), *spec.shape(parts[0], k, groups))
            elif spec.out_dim is None:
                shape = spec.shape(parts[0], k, groups)
            else:
                shape = spec.shape(sum(parts), k, groups)
            param = nn.Parameter(torch.zeros(shape, dtype=spec.keep, device=device), requires_grad=False)
            param.weight_loader = self._loader(layer, name, spec, parts, k, groups)
            layer.register_parameter(name, param)

    def checkpoint_tensors(self, layer: nn.Module, shape: tuple[int, ...]) -> dict[str, DeclaredTensor]:
        """What one checkpoint module of `layer` (dense weight shape (n, k): one part of a packed layer) stores
        instead of its `weight`, for the loaders' schema check: each stored tensor's shape, and its dtype where only
        one is accepted."""
        n, k = shape
        groups = self.groups(k)
        return {name: DeclaredTensor(spec.shape(n, k, groups), spec.dtypes[0] if len(spec.dtypes) == 1 else None)
                for name, spec in self.stored().items()}

    def _loader(self, layer: nn.Module, name: str, spec: StoredTensor, parts: list[int], k: int, groups: int):
        seen: set = set()

        def load(param: nn.Parameter, loaded, shard_id=None) -> None:
            index = None if shard_id is None else layer.shard_index(shard_id)
            n = sum(parts) if index is None else parts[index]
            expected = spec.shape(n, k, groups)
            if tuple(loaded.shape) != tuple(expected):
                raise ValueError(f"has shape {tuple(loaded.shape)}; {self.fmt} with group_size {self.group_size} "
                                 f"expects {tuple(expected)} for {n} output x {k} input features")
            if loaded.dtype not in spec.dtypes:
                raise ValueError(f"has dtype {loaded.dtype}; {self.fmt} stores {name} as "
                                 f"{' or '.join(str(d) for d in spec.dtypes)}")
            value = materialize(loaded)
            with torch.no_grad():
                if spec.out_dim == "part":
                    param.data[index or 0].copy_(value)
                elif spec.out_dim is None:
                    if seen and not torch.equal(param.data, value.to(param.dtype).to(param.device)):
                        raise ValueError(f"differs between the parts of {type(layer).__name__} (they share one "
                                         f"input, so one {name})")
                    param.data.copy_(value)
                else:
                    offset = 0 if index is None else sum(parts[:index]) // spec.out_div
                    param.data.narrow(spec.out_dim, offset, value.shape[spec.out_dim]).copy_(value)
            seen.add(shard_id)

        return load

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        parts, k = layer_parts(layer)
        tensors = {name: getattr(layer, name).data for name in self.stored()}
        device = next(iter(tensors.values())).device  # where they were loaded
        weight = self.to_int4(tensors, parts, k)
        for name in tensors:
            layer.register_parameter(name, None)
        layer.qpack = Int4Linear.prepare(weight, device, self.dtype)
        self.kind = f"{self.fmt}-{layer.qpack.kernel}"

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return int4_linear(layer.qpack, x, bias)

    def native_pack(self, layer: nn.Module):
        return layer.qpack.native_pack()


def group_order(g_idx: torch.Tensor, group_size: int, groups: int, what: str) -> torch.Tensor | None:
    """The K permutation that makes `g_idx`'s groups contiguous (None when they already are: `k // group_size`).
    LoadError naming `what` when g_idx is not a grouping of group_size features per group."""
    k = g_idx.numel()
    size = k if group_size == -1 else group_size
    natural = torch.arange(k, dtype=torch.int64) // size
    g = g_idx.to(torch.int64)
    if torch.equal(g, natural):
        return None
    if g.min() < 0 or g.max() >= groups:
        raise LoadError(f"{what}: group indices must lie in [0, {groups}) (got {int(g.min())}..{int(g.max())})")
    perm = torch.sort(g, stable=True).indices
    if not torch.equal(g[perm], natural):
        raise LoadError(f"{what}: every group must hold exactly {size} input features")
    return perm


_REQUIRED = object()


def config_field(quant: Mapping, key: str, fmt: str, types: type | tuple[type, ...], default=_REQUIRED,
                 allowed: tuple = (), aliases: tuple[str, ...] = ()):
    """`quantization_config[key]` (or its first present alias) checked against `types` and `allowed`; LoadError
    naming the field and what would be accepted. `default` when absent (required when not given)."""
    for name in (key, *aliases):
        if name in quant:
            value = quant[name]
            break
    else:
        if default is _REQUIRED:
            raise LoadError(f"quantization_config.{key}: missing; a {fmt} checkpoint's config.json must set it")
        return default
    if not isinstance(value, types) or isinstance(value, bool) and bool not in (
            types if isinstance(types, tuple) else (types,)):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise LoadError(f"quantization_config.{key}: {value!r} has the wrong type (expected {names})")
    if allowed and value not in allowed:
        raise LoadError(f"quantization_config.{key}: {value!r} is not supported by weavelm's {fmt} scheme; "
                        f"supported: {', '.join(map(repr, allowed))}")
    return value


def int4_group_size(quant: Mapping, fmt: str, aliases: tuple[str, ...] = ()) -> int:
    """The checkpoint's group size: a positive int, or -1 (one group per output feature over all inputs)."""
    size = config_field(quant, "group_size", fmt, int, aliases=aliases)
    if size != -1 and size <= 0:
        raise LoadError(f"quantization_config.group_size: {size} must be positive or -1 (one group)")
    return size


def single_rank_reasons(spec, fmt: str) -> list[str]:
    """What a `check(spec)` of an int4 format says about where it runs."""
    if spec.world_size != 1:
        return [f"{fmt} int4 layers do not support tensor parallelism yet; use tensor_parallel_size 1"]
    return []


def select_from_checkpoint(cls, spec, needs: str):
    """`QuantizationConfig.select` for a scheme named explicitly (`quantization: gptq`): its settings come from the
    checkpoint, so one that is not of its format is a ConfigError saying what it `needs`."""
    from weavelm.errors import ConfigError

    picked = cls.from_checkpoint(spec)
    if picked is None:
        raise ConfigError([("quantization.name", f"{cls.name!r} needs {needs}; use auto or none")])
    reasons = cls.check(spec)
    if reasons:
        raise ConfigError([("quantization.name", f"{cls.name!r} cannot run here: {'; '.join(reasons)}")])
    return picked


def how_int4_runs(device: str) -> str:
    """`QuantizationConfig.how_it_runs` of the int4 formats (shown by `weavelm plugins`)."""
    if device == "cuda":
        return "int4 weight-only: Triton int4 GEMM (fp16/bf16), cuBLAS on the dequantized weight from 256 rows"
    return ("int4 weight-only: native fp32 block kernels or torch's bf16 int4 kernel (group a multiple of 32), "
            "else dequantized per call")
