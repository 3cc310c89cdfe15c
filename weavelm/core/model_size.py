"""Checking a model's size before anything is allocated.

`check_model_size` runs between reading `config.json` and building the model on the device. It validates the
config's dimensions, builds the architecture on the `meta` device (no memory, no init) to count its parameters and
bytes exactly, compares that count with the elements the checkpoint on disk holds (read from file headers, not
data), and compares the bytes with the memory free on the device. Each failure is a LoadError giving both numbers,
so an 8B-shaped config beside a tiny checkpoint, or a config larger than memory, costs nothing.

Under tensor parallelism the memory check counts this rank's shard (the model built with the rank's group), while
the checkpoint check compares the whole model (built with one rank) with the whole checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from weavelm.distributed import TensorParallelGroup
from weavelm.errors import ConfigError, LoadError

logger = logging.getLogger("weavelm.loading")

# Upper bounds on config.json dimensions: far above any released decoder, low enough that the host-side work of a
# meta-device build (Python objects per layer, the rotary table) stays small.
DIM_LIMITS = {
    "vocab_size": 1 << 24,
    "hidden_size": 1 << 20,
    "intermediate_size": 1 << 22,
    "num_hidden_layers": 4096,
    "num_attention_heads": 1 << 14,
    "num_key_value_heads": 1 << 14,
    "head_dim": 4096,
    "max_position_embeddings": 1 << 24,
}
# The rotary cos/sin tables (max_position_embeddings x head_dim / 2, fp32) are computed on the host even for a meta
# build; this caps them at 2 GiB each.
MAX_POSITION_TABLE = 1 << 30
# How far the checkpoint's element count may stray from the parameter count before the load is refused outright.
# Within this factor the model is built and the load's per-tensor checks name the tensors that are missing or
# mis-shaped (more useful than two totals); beyond it the config is for another model and building it could cost
# many times the checkpoint's memory.
CHECKPOINT_RATIO = 1.5
GIB = 1 << 30


@dataclass(frozen=True)
class ModelSize:
    """What the config implies: the whole model's parameters (tied ones counted once) and the bytes of parameters
    plus buffers one rank holds (the whole model on one rank)."""

    num_params: int
    num_bytes: int
    tied_embedding_params: int  # elements a checkpoint may also hold as lm_head.weight when embeddings are tied


def validate_dims(hf_config: Any, source: str) -> None:
    """LoadError naming every dimension of `config.json` that is not an integer in its range."""
    problems = []
    for key, upper in DIM_LIMITS.items():
        value = getattr(hf_config, key, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
            problems.append(f"{key} must be an integer in 1..{upper} (got {_short(value)})")
    if not problems:
        heads = getattr(hf_config, "num_attention_heads", None)
        head_dim = getattr(hf_config, "head_dim", None) or (
            hf_config.hidden_size // heads if heads and getattr(hf_config, "hidden_size", None) else None)
        positions = getattr(hf_config, "max_position_embeddings", None)
        if head_dim is not None and positions is not None and positions * head_dim > MAX_POSITION_TABLE:
            problems.append(f"max_position_embeddings x head_dim = {positions} x {head_dim} exceeds "
                            f"{MAX_POSITION_TABLE} (the rotary table would not fit in memory)")
    if problems:
        raise LoadError(f"{_config_file(source)}: " + "; ".join(problems))


def build_model(model_cls: type, hf_config: Any, tp: TensorParallelGroup,
                pp: TensorParallelGroup | None = None, parallel: Any = None) -> torch.nn.Module:
    """`model_cls(hf_config, tp)` (`model_cls(hf_config)` on one rank, so single-rank architectures need no `tp`
    argument); with several pipeline stages `model_cls(hf_config, tp, pp=pp)`, for an architecture that declares
    `supports_pp` (ConfigError otherwise); with expert parallelism (`parallel`, a `ParallelContext` whose layout has
    `expert` and whose expert group has several ranks) `model_cls(hf_config, tp, parallel=parallel)`, for
    architectures that declare `supports_expert_parallel` (ConfigError otherwise). In the caller's device and
    default-dtype context."""
    if pp is not None and pp.world_size > 1:
        if not getattr(model_cls, "supports_pp", False):
            raise ConfigError([("executor.pipeline_parallel_size", f"the {model_cls.__name__} architecture does not "
                                f"support pipeline parallelism (it does not declare supports_pp); use "
                                f"pipeline_parallel_size 1 (tensor_parallel_size splits it instead)")])
        num_layers = getattr(hf_config, "num_hidden_layers", None)
        if isinstance(num_layers, int) and num_layers < pp.world_size:
            raise ConfigError([("executor.pipeline_parallel_size", f"{pp.world_size} stages but the model has "
                                f"{num_layers} layers; use pipeline_parallel_size <= {num_layers}")])
        return model_cls(hf_config, tp, pp=pp)
    if parallel is not None and parallel.layout.expert and parallel.ep.world_size > 1:
        if not getattr(model_cls, "supports_expert_parallel", False):
            raise ConfigError([("executor.enable_expert_parallel", f"{model_cls.__name__} has no mixture-of-experts "
                                "layers to spread; turn enable_expert_parallel off")])
        return model_cls(hf_config, tp, parallel=parallel)
    if tp.world_size == 1:
        return model_cls(hf_config)
    return model_cls(hf_config, tp)


def measure(model_cls: type, hf_config: Any, dtype: torch.dtype, source: str,
            tp: TensorParallelGroup = TensorParallelGroup(), pp: TensorParallelGroup | None = None,
            quant: Any = None) -> ModelSize:
    """Build the architecture on the meta device and count its parameters and bytes (exact for any architecture;
    nothing is allocated): bytes of the rank's shard (`tp` rank of pipeline stage `pp`), parameters of the whole
    (single-rank) model. With a quantization config (`quant`), the bytes are those of the weights its methods create
    (e.g. fp8), as far as they are known before loading (a method that repacks after loading is counted dense)."""
    shard = _meta_build(model_cls, hf_config, dtype, source, tp, pp)
    one_rank = tp.world_size == 1 and (pp is None or pp.world_size == 1)
    whole = shard if one_rank else _meta_build(model_cls, hf_config, dtype, source, TensorParallelGroup())
    num_params = sum(p.numel() for p in whole.parameters())
    if quant is not None:
        from weavelm.core.quantization import attach

        attach(shard, quant)
    num_bytes = sum(t.numel() * t.element_size() for t in [*shard.parameters(), *shard.buffers()])
    tied = 0
    if getattr(hf_config, "tie_word_embeddings", False):
        tied = int(getattr(hf_config, "vocab_size", 0) or 0) * int(getattr(hf_config, "hidden_size", 0) or 0)
    return ModelSize(num_params, num_bytes, tied)


def check_checkpoint(size: ModelSize, checkpoint_elements: int | None, source: str) -> None:
    """LoadError when the checkpoint's element count is off from the model's by more than CHECKPOINT_RATIO (tied
    embeddings may or may not be in the checkpoint). None: unknown, no check."""
    if checkpoint_elements is None:
        return
    low = size.num_params / CHECKPOINT_RATIO
    high = (size.num_params + size.tied_embedding_params) * CHECKPOINT_RATIO
    if not low <= checkpoint_elements <= high:
        raise LoadError(f"{source}: config.json does not match the weights: it describes {size.num_params:,} "
                        f"parameters but the checkpoint holds {checkpoint_elements:,} elements; use the config.json "
                        f"that was saved with these weights (or the complete checkpoint)")


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`, or None when unknown.

    CUDA: `torch.cuda.mem_get_info`. CPU: the least of /proc/meminfo's MemAvailable, the cgroup v2 limit less its
    usage, and the address-space limit (RLIMIT_AS) less the process's current size.
    """
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    candidates = [_meminfo_kib("/proc/meminfo", "MemAvailable"), _cgroup_free(), _address_space_left()]
    known = [c for c in candidates if c is not None]
    return min(known) if known else None


def check_fits_memory(num_bytes: int, device: torch.device, what: str) -> None:
    """LoadError when `num_bytes` exceed the memory available on `device` (skipped when that is unknown)."""
    free = available_memory(device)
    if free is None:
        logger.debug("memory available on %s is unknown; not checking %s", device, what)
        return
    if num_bytes > free:
        raise LoadError(f"{what} needs {num_bytes / GIB:,.2f} GiB ({num_bytes:,} bytes) but only "
                        f"{free / GIB:,.2f} GiB ({free:,} bytes) is available on {device}; use a smaller model "
                        f"or dtype, or free memory")


def check_model_size(model_cls: type, hf_config: Any, dtype: torch.dtype, device: torch.device, loader: Any,
                     path: str, tp: TensorParallelGroup = TensorParallelGroup(),
                     pp: TensorParallelGroup | None = None, quant: Any = None) -> ModelSize:
    """Everything above, in order, before the model is built on `device`. Called by the model runner's loading
    code with the loader that will load `path` and the rank's tensor-parallel group;
    `loader.checkpoint_num_elements(path)` (None when the loader cannot tell, e.g. `dummy`) gives the checkpoint
    side. `quant`: the engine's quantization config, whose methods' weights are counted (see `measure`)."""
    validate_dims(hf_config, path)
    size = measure(model_cls, hf_config, dtype, path, tp, pp, quant)
    check_checkpoint(size, loader.checkpoint_num_elements(path), path)
    what = "the model" if tp.world_size == 1 else f"rank {tp.rank}'s shard of the model"
    if pp is not None and pp.world_size > 1:
        what = f"pipeline stage {pp.rank}'s " + ("layers" if tp.world_size == 1 else f"tensor rank {tp.rank} shard")
    check_fits_memory(size.num_bytes, device, f"{path}: {what} ({size.num_params:,} parameters in {dtype})")
    return size


def _meta_build(model_cls: type, hf_config: Any, dtype: torch.dtype, source: str,
                tp: TensorParallelGroup, pp: TensorParallelGroup | None = None) -> torch.nn.Module:
    try:
        with default_dtype(dtype), torch.device("meta"):
            return build_model(model_cls, hf_config, tp, pp)
    except ConfigError:
        raise
    except TypeError as e:
        if tp.world_size > 1 and "positional argument" in str(e):
            raise LoadError(f"the {model_cls.__name__} architecture does not support tensor parallelism (its "
                            f"constructor takes no `tp`); use tensor_parallel_size 1") from e
        raise LoadError(f"{_config_file(source)}: describes a {model_cls.__name__} that cannot be built "
                        f"({type(e).__name__}: {e}); check its dimensions") from e
    except Exception as e:  # an architecture raises whatever its layers raise for impossible dimensions
        hint = " and the tensor-parallel size" if tp.world_size > 1 else ""
        raise LoadError(f"{_config_file(source)}: describes a {model_cls.__name__} that cannot be built "
                        f"({type(e).__name__}: {e}); check its dimensions{hint}") from e


def _config_file(source: str) -> str:
    return os.path.join(source, "config.json") if os.path.isdir(source) else source


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build tensors in `dtype` inside the block (how models are built in the engine's dtype)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _meminfo_kib(file: str, key: str) -> int | None:
    try:
        with open(file) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_free() -> int | None:
    try:
        with open("/proc/self/cgroup") as f:
            rel = next((ln.strip().split(":", 2)[2] for ln in f if ln.startswith("0::")), None)
        if rel is None:
            return None
        folder = os.path.join("/sys/fs/cgroup", rel.lstrip("/"))
        with open(os.path.join(folder, "memory.max")) as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(folder, "memory.current")) as f:
            return max(int(limit) - int(f.read().strip()), 0)
    except (OSError, ValueError, IndexError):
        return None


def _address_space_left() -> int | None:
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    size = _meminfo_kib("/proc/self/status", "VmSize")
    return max(soft - size, 0) if size is not None else None
