"""The `quantization` plugin kind: vLLM's `QuantizationConfig` / `QuantizeMethodBase` shape.

A `QuantizationConfig` (a registered component, chosen by YAML `quantization: {name: ...}`, or by `auto` from what
the checkpoint holds) answers, for each layer of a built model, `get_quant_method(layer, prefix)`: a
`QuantizeMethodBase` that owns that layer's weight, or None to leave the layer as it is. The model runner's loading
code does vLLM's three steps:

1. build the model (each linear layer creates its dense `weight` as usual), then `attach(model, config)` calls
   `method.create_weights(layer)` for every layer the config claims (a method may replace the weight's
   `weight_loader` to receive the checkpoint tensors in their stored, quantized form). With a quantization config
   the model is built with its parameters on the `meta` device (`parameters_on_meta`), so a dense weight a method
   replaces is never allocated; `materialize(model, device)` then allocates every parameter still on meta (the
   methods' own ones included, since a method creates its tensors on its dense weight's device);
2. the loader streams the checkpoint into the model;
3. `process_weights_after_loading(model)` lets each method repack its layer once into the form its kernel
   consumes (int4/int8 packs on CPU; fp8 or GPU int4 layouts later) and free the dense weight.

Afterwards a quantized layer's matmul is `layer.quant_method.apply(layer, x, bias)` (see
`weavelm.layers.linear_apply`); a layer without a method runs `F.linear` on its weight.
Methods work on any device; each config says in `check(spec)` where it can run, as attention backends do.

A method is opaque to the model and to the native CPU stack: they only call `apply` and `native_pack`. What a
loader hands a method is declared too: a tensor stored quantized arrives as a `QuantizedTensor` (its stored blocks
and their format's name), any other tensor as a plain tensor or `LazyTensor`.

Checkpoints that store a layer as several tensors (fp8's `weight` + `weight_scale_inv`, GPTQ's `qweight` /
`qzeros` / `scales` / `g_idx`) reach the method by name: in `create_weights` the method registers one parameter per
stored tensor on the layer, named by the checkpoint's suffix, each with a `weight_loader(param, loaded, shard_id)`
(it may also replace the dense `weight` with its own, before any data is written to it, so the dense copy is
never filled). `weavelm.layers.load_checkpoint` then routes `<module>.<suffix>` to that parameter with the part's
shard id (`q_proj.weight_scale_inv` -> `qkv_proj.weight_scale_inv`, shard "q"), as it does for `weight`. The
method declares the same tensors, with their whole shapes and dtypes where fixed, in `checkpoint_tensors`; the
loaders' schema check (`checkpoint_schema`, used by `weavelm.plugins.loaders.common`) then expects them in place of
the dense weight, so an unexpected, missing, mis-shaped or mistyped tensor is a LoadError naming it before any
tensor data is read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel

from weavelm.core.interfaces import Component, NoOptions
from weavelm.core.model_files import LazyTensor, ShardReader

if TYPE_CHECKING:
    from weavelm.ops.quant_kernels import BlockQ4Pack, BlockQ8Pack


class QuantizedTensor(LazyTensor):
    """A checkpoint tensor stored quantized, as a loader hands it to a parameter's `weight_loader`: it reads as a
    float tensor like any `LazyTensor` (`shape` is the logical, dequantized shape; `materialize` / `narrow`
    dequantize), so a layer without a quantization method loads it dense; a method that keeps the stored form reads
    `quant_type` and `raw_rows()`.

    quant_type: the storage format's name, e.g. GGUF's "Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q6_K".
    raw_rows(): the stored bytes, (shape[0], bytes_per_row) uint8, one row per output feature in the checkpoint's
    logical (Hugging Face) row order (a loader undoes any row permutation of its format, e.g. llama.cpp's Q/K).
    """

    __slots__ = ("quant_type", "_raw_rows")

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, read: ShardReader, quant_type: str,
                 raw_rows: Callable[[], np.ndarray]):
        super().__init__(shape, dtype, read)
        self.quant_type = quant_type
        self._raw_rows = raw_rows

    def raw_rows(self) -> np.ndarray:
        return self._raw_rows()

    def __repr__(self) -> str:
        return f"QuantizedTensor(shape={tuple(self.shape)}, quant_type={self.quant_type})"


@dataclass
class QuantSpec:
    """What a quantization config is chosen and checked with.

    device: "cpu" | "cuda"; dtype: the engine's activation dtype; world_size: tensor-parallel ranks;
    weight_types: the checkpoint's stored tensor types by Hugging Face name (e.g. {"model.layers.0.mlp.down_proj.weight":
    "Q4_1"}; empty for float checkpoints), from `ModelLoader.weight_types(path)`.
    checkpoint_quant: the checkpoint's own `quantization_config` (its config.json entry, as a dict; empty when it
    has none), e.g. {"quant_method": "fp8", "weight_block_size": [128, 128]} or {"quant_method": "gptq", ...}.
    """

    device: str
    dtype: torch.dtype
    world_size: int = 1
    weight_types: Mapping[str, str] = field(default_factory=dict)
    checkpoint_quant: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointTensor:
    """A tensor a quantization method loads from the checkpoint, as the loaders' schema check expects it.

    shape: the whole (all ranks) shape, or None when several are valid (the method's weight_loader checks it);
    dtype: the stored dtype, or None for any; required: whether a checkpoint without it is incomplete.
    """

    shape: tuple[int, ...] | None
    dtype: torch.dtype | None = None
    required: bool = True  # False: a checkpoint may leave it out (e.g. GPTQ's g_idx without desc_act)


class QuantizeMethodBase(ABC):
    """How one layer's weight is created, repacked and multiplied (vLLM's `QuantizeMethodBase`).

    Called by the loading code, in order: `create_weights(layer)` once after the model is built (the layer's dense
    `weight` parameter exists; a method may wrap its `weight_loader`), the checkpoint load, then
    `process_weights_after_loading(layer)` once; then `apply(layer, x, bias)` on every forward, from the layer.
    """

    @abstractmethod
    def create_weights(self, layer: torch.nn.Module) -> None:
        """Prepare `layer` to receive its checkpoint tensors (e.g. wrap `layer.weight.weight_loader`)."""

    @abstractmethod
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Repack the loaded weight into this method's kernel format (called once, after every tensor arrived)."""

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x @ W^T + bias` for `x` of shape (tokens, in_features), in x's dtype."""

    def checkpoint_tensors(self, layer: torch.nn.Module,
                           shape: tuple[int, ...]) -> Mapping[str, CheckpointTensor] | None:
        """The tensors one checkpoint module of `layer` stores under this method, by name suffix (e.g. {"weight":
        fp8 (N, K), "weight_scale_inv": (N / 128, K / 128)}), given `shape`, the whole dense weight's shape of that
        module (for one part of a packed layer, e.g. `q_proj` of `qkv_proj`, that part's). They replace the module's
        `<prefix>.weight` in the expected tensors (each required unless `required=False`). None (the default): the
        module stores its dense weight. Asked by the loaders' schema check after `create_weights`, before any
        tensor is read; every suffix named must be a parameter the method registered on the layer (see the module
        docstring)."""
        return None

    def native_pack(self, layer: torch.nn.Module) -> BlockQ4Pack | BlockQ8Pack | None:
        """The layer's weight as blocks the native fp32 CPU kernels multiply (`weavelm.ops.quant_kernels`'
        `BlockQ4Pack` or `BlockQ8Pack`, holding the same values `apply` uses), or None (the default) when this
        method has none. Asked once, after `process_weights_after_loading`, by the native decoder stack
        (`plugins/models/native_stack.py`), which then runs the layer's matmul itself; the pack must stay alive
        and unchanged as long as the layer does."""
        return None


def native_pack(layer: torch.nn.Module) -> BlockQ4Pack | BlockQ8Pack | None:
    """The native block pack of `layer`'s quantization method, or None (no method, or the method has none)."""
    method = getattr(layer, "quant_method", None)
    return None if method is None else method.native_pack(layer)


class QuantizationConfig(Component, ABC):
    """A registered quantization scheme (kind `quantization`). Built as `cls(options)`; `select` may choose
    another scheme (the `auto` selector does)."""

    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: BaseModel):
        self.options = options

    @classmethod
    def select(cls, options: BaseModel, spec: QuantSpec,
               candidates: Mapping[str, type[QuantizationConfig]]) -> QuantizationConfig | None:
        """The config to use for `spec` (None: no quantization). Default: this class, if `check(spec)` passes;
        otherwise a ConfigError with the reasons."""
        reasons = cls.check(spec)
        if reasons:
            from weavelm.errors import ConfigError
            raise ConfigError([("quantization.name", f"{cls.name!r} cannot run here: {'; '.join(reasons)}")])
        return cls(options)

    @classmethod
    def check(cls, spec: QuantSpec) -> list[str]:
        """The reasons this scheme cannot run for `spec` (empty: it runs)."""
        return []

    @classmethod
    def how_it_runs(cls, device: str) -> str:
        """One line on how this scheme computes on `device` ("cpu" or "cuda", this machine's), e.g. "W8A8 fp8
        GEMMs" or "weight-only: dequantized per call", shown by `weavelm plugins`; "" (the default) says nothing."""
        return ""

    @classmethod
    def from_checkpoint(cls, spec: QuantSpec) -> QuantizationConfig | None:
        """This scheme configured from the checkpoint's `quantization_config` (`spec.checkpoint_quant`) when that
        config is this scheme's format (e.g. `quant_method: gptq`), else None (the default). `quantization: auto`
        asks every registered scheme; a malformed config of this scheme's format is a LoadError naming the field."""
        return None

    @abstractmethod
    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        """The method owning `layer`'s weight (`prefix`: its module name, e.g. `layers.0.mlp.down_proj`), or None
        to leave it unquantized. Called for every module of the model."""


def layer_kind(layer: torch.nn.Module) -> str | None:
    """What a layer offers a quantization method: "linear" (its forward is `x @ W^T + b` through
    `linear_apply`), "embedding" (rows looked up densely, and `compute_logits` multiplies through its method), or
    None. Layers declare it as the class attribute `quant_kind`."""
    return getattr(type(layer), "quant_kind", None)


def attach(model: torch.nn.Module, config: QuantizationConfig | None) -> int:
    """Step 1: give every layer `config` claims its method (`layer.quant_method`) and let it create its weights.
    Returns how many layers were claimed."""
    if config is None:
        return 0
    claimed = 0
    for prefix, module in model.named_modules():
        method = config.get_quant_method(module, prefix)
        if method is None:
            continue
        module.quant_method = method
        method.create_weights(module)
        claimed += 1
    return claimed


def process_weights_after_loading(model: torch.nn.Module) -> None:
    """Step 3 (vLLM's loader's last step): each attached method repacks its layer once."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)


def describe(model: torch.nn.Module) -> dict[str, int]:
    """Layers per method class name (for logs and `model_info`)."""
    out: dict[str, int] = {}
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            key = getattr(method, "kind", type(method).__name__)
            out[key] = out.get(key, 0) + 1
    return out


def resolve(section: Any, registry: Any, spec: QuantSpec) -> QuantizationConfig | None:
    """The config for the engine's `quantization` section (a ComponentConfig) and `spec`."""
    cls = registry.get("quantization", section.name)
    return cls.select(section.options, spec, registry.classes("quantization"))


@dataclass
class CheckpointSchema:
    """The tensors a checkpoint must hold for a model with its methods attached (Hugging Face names).

    shapes: name -> whole shape, or None (not checked by the schema: the weight loader checks it);
    dtypes: name -> stored dtype, where a method fixes it; optional: names that may be absent.
    """

    shapes: dict[str, tuple[int, ...] | None]
    dtypes: dict[str, torch.dtype]
    optional: set[str]


def checkpoint_schema(model: torch.nn.Module, shapes: Mapping[str, tuple[int, ...]],
                      optional: set[str] | frozenset[str] = frozenset()) -> CheckpointSchema:
    """The expected checkpoint tensors of `model` with its attached methods: `shapes` (Hugging Face name -> dense
    shape, as the loaders' schema has them; `optional` names may be absent) with every `<module>.weight` whose
    layer has a method that declares `checkpoint_tensors` replaced by those tensors. A checkpoint module maps onto
    the model's layer through the model's `hf_to_weavelm_mapper` and `packed_modules_mapping`
    (`model.layers.0.self_attn.q_proj` -> `layers.0.self_attn.qkv_proj`)."""
    from weavelm.layers.weights import WeightsMapper

    mapper = getattr(model, "hf_to_weavelm_mapper", None) or WeightsMapper()
    packed = {part: name for name, parts in (getattr(model, "packed_modules_mapping", None) or {}).items()
              for part in parts}
    modules = dict(model.named_modules())
    schema = CheckpointSchema({}, {}, set(optional))
    for name, shape in shapes.items():
        declared = None
        if name.endswith(".weight"):
            module_name = mapper.map_name(name[:-len(".weight")])
            head, _, leaf = module_name.rpartition(".")
            layer = modules.get(f"{head}.{packed.get(leaf, leaf)}" if head else packed.get(leaf, leaf))
            method = getattr(layer, "quant_method", None)
            declared = method.checkpoint_tensors(layer, tuple(shape)) if method is not None else None
        if declared is None:
            schema.shapes[name] = shape
            continue
        schema.optional.discard(name)
        prefix = name[:-len("weight")]
        for suffix, spec in declared.items():
            schema.shapes[prefix + suffix] = spec.shape
            if spec.dtype is not None:
                schema.dtypes[prefix + suffix] = spec.dtype
            if not spec.required or name in optional:
                schema.optional.add(prefix + suffix)
    return schema


@dataclass(frozen=True)
class QuantSummary:
    """What runs after loading: layers per method kind (e.g. {"fp8-block/w8a8-block-triton": 196}) and the bytes
    of the model's parameters and buffers resident on its device (weights, scales, tables)."""

    methods: dict[str, int]
    weight_bytes: int

    def __str__(self) -> str:
        methods = ", ".join(f"{k} x{v}" for k, v in sorted(self.methods.items())) or "none (dense)"
        mib = self.weight_bytes / (1 << 20)
        size = f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.1f} MiB"
        return f"quantization {methods}; weights {size} ({self.weight_bytes:,} bytes) resident"


def summary(model: torch.nn.Module) -> QuantSummary:
    """The `QuantSummary` of a loaded model (for the load log line and `model_info`)."""
    methods: dict[str, int] = {}
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            kind = getattr(method, "kind", type(method).__name__)
            mode = getattr(method, "mode", None)
            key = f"{kind}/{mode}" if mode else kind
            methods[key] = methods.get(key, 0) + 1
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    for module in model.modules():  # packs a method keeps outside parameters (int8 / gguf `qpack`)
        pack = getattr(module, "qpack", None)
        if pack is not None and callable(getattr(pack, "nbytes", None)):
            total += pack.nbytes()
        elif pack is not None:
            tensors = [v for v in getattr(pack, "__dict__", {}).values() if isinstance(v, torch.Tensor)]
            total += sum(t.numel() * t.element_size() for t in tensors)
    return QuantSummary(methods, total)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """While a model is built inside this block, every parameter a module registers is moved to the `meta` device
    (its attributes, e.g. `weight_loader`, kept): each dense tensor a layer creates is freed as soon as it is
    registered, before any data is written to it, so building costs the largest single parameter, not the model.
    Buffers (rotary tables) are built as usual. The build must be single-threaded (it swaps
    `nn.Module.register_parameter` for the block, as accelerate's `init_empty_weights` does)."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            meta = torch.nn.Parameter(param.data.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)
            param = meta
        original(module, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Allocate (uninitialised, to be loaded) every parameter of `model` still on the meta device on `device`,
    keeping its attributes; a buffer a method created on meta is zero-filled there."""
    done: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in done:
                real = torch.nn.Parameter(torch.empty_like(param, device=device), requires_grad=param.requires_grad)
                real.__dict__.update(param.__dict__)
                done[id(param)] = real
            module._parameters[name] = done[id(param)]
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.zeros_like(buf, device=device)
