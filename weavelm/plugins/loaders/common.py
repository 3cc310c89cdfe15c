"""What every file-format loader shares: finding the weight files, reading index files, and checking the stream of
checkpoint tensors against the shapes the architecture expects, so that an error names the file and the tensor.

A loader built on `FileLoader` implements `iter_sourced(path)`, yielding `(file, name, tensor)` where the tensor may
be a `LazyTensor` (read on demand, whole or one shard); `iter_weights` and `checked_weights` hand out whole tensors,
while `load_weights` runs the lazy stream through `check_stream` into the model, whose weight loaders read only
their tensor-parallel shard.
"""

from __future__ import annotations

import json
import logging
import os
from abc import abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

import torch

from weavelm.core.interfaces import ModelArchitecture, ModelLoader
from weavelm.core.model_files import LazyTensor, materialize
from weavelm.errors import LoadError

logger = logging.getLogger("weavelm.loaders")

WeightRecord = tuple[str, str, torch.Tensor | LazyTensor]
"""(file the tensor came from, Hugging Face checkpoint name, tensor or lazy tensor)."""

# Architectures whose checkpoint names are exactly their transformers state-dict names, so the expected tensors and
# shapes can be read off a meta-device transformers model. Others are checked by the engine model's load_weights.
SCHEMA_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Buffers that old checkpoints carry but no model loads (vLLM skips them too).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Tensor names quantized checkpoints add (fp8, compressed-tensors, GPTQ / AWQ): named in the unexpected-tensor error.
QUANT_SUFFIXES = ("weight_scale_inv", "weight_scale", "input_scale", "qweight", "qzeros", "scales", "g_idx",
                  "weight_packed", "weight_zero_point", "weight_shape")


def weight_files(path: str, *, single: tuple[str, ...], index: str, suffixes: tuple[str, ...],
                 fmt: str) -> list[str]:
    """The weight files of `path`: the file itself, the shards an index lists, or the single file(s) in a directory."""
    if os.path.isfile(path):
        if not path.endswith(suffixes):
            raise LoadError(f"{path}: not a {fmt} file (expected a name ending in {' or '.join(suffixes)})")
        return [path]
    if not os.path.isdir(path):
        raise LoadError(f"model: {path!r} does not exist; give a model directory or a {fmt} file")
    index_path = os.path.join(path, index)
    if os.path.isfile(index_path):
        return read_index(index_path)
    for name in single:
        if os.path.isfile(os.path.join(path, name)):
            return [os.path.join(path, name)]
    found = sorted(f for f in os.listdir(path) if f.endswith(suffixes))
    if not found:
        raise LoadError(f"{path}: no {fmt} weights ({', '.join(single)} or {index}); convert the model with "
                        f"`weavelm convert {path} OUT --to ...` or choose the loader that matches its files")
    return [os.path.join(path, f) for f in found]


def read_index(index_path: str) -> list[str]:
    """The shard files named by a Hugging Face `*.index.json`, in first-use order; each must exist."""
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LoadError(f"{index_path}: not a valid index file (needs a 'weight_map' of tensor -> shard): {e}") from e
    if not isinstance(weight_map, dict):
        raise LoadError(f"{index_path}: 'weight_map' must map tensor names to shard files")
    folder = os.path.dirname(index_path)
    shards = list(dict.fromkeys(weight_map.values()))
    for shard in shards:
        if os.path.basename(shard) != shard:
            raise LoadError(f"{index_path}: shard {shard!r} must be a file name in the same directory")
        if not os.path.isfile(os.path.join(folder, shard)):
            tensor = next(n for n, s in weight_map.items() if s == shard)
            raise LoadError(f"{index_path}: shard {shard!r} (holding tensor {tensor!r}) is missing")
    return [os.path.join(folder, s) for s in shards]


def expected_tensors(hf_config: Any) -> tuple[dict[str, tuple[int, ...]], set[str]] | None:
    """`(name -> shape, optional names)` a checkpoint of this config holds, or None when not known here.

    Written out from the config for the dense decoders of SCHEMA_MODEL_TYPES (the names and shapes of their
    transformers state dicts; `tests/test_load_checks.py` checks the two agree), so checking a checkpoint does not
    import transformers' modeling code (seconds of a cold start). `lm_head.weight` is optional when the embeddings
    are tied.
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SCHEMA_MODEL_TYPES:
        return None
    try:
        shapes = decoder_tensor_shapes(hf_config, model_type)
    except (AttributeError, TypeError) as e:  # an unusual config: leave the checks to the engine model
        logger.debug("no tensor schema for %s: %s", model_type, e)
        return None
    optional = {"lm_head.weight"} if getattr(hf_config, "tie_word_embeddings", False) else set()
    return shapes, optional


def decoder_tensor_shapes(cfg: Any, model_type: str) -> dict[str, tuple[int, ...]]:
    """The transformers state-dict shapes of a llama / mistral / qwen2 / qwen3 causal LM."""
    hidden, vocab, inter = int(cfg.hidden_size), int(cfg.vocab_size), int(cfg.intermediate_size)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    if model_type == "qwen2":
        qkv_bias, o_bias, mlp_bias = True, False, False
    else:
        qkv_bias = o_bias = bool(getattr(cfg, "attention_bias", False))
        mlp_bias = bool(getattr(cfg, "mlp_bias", False)) if model_type == "llama" else False
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden),
                                          "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(int(cfg.num_hidden_layers)):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        for name, rows in (("q_proj", heads * head_dim), ("k_proj", kv_heads * head_dim),
                           ("v_proj", kv_heads * head_dim)):
            shapes[p + f"self_attn.{name}.weight"] = (rows, hidden)
            if qkv_bias:
                shapes[p + f"self_attn.{name}.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        if o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (hidden,)
        if model_type == "qwen3":
            shapes[p + "self_attn.q_norm.weight"] = (head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (head_dim,)
        for name, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                            ("down_proj", (hidden, inter))):
            shapes[p + f"mlp.{name}.weight"] = shape
            if mlp_bias:
                shapes[p + f"mlp.{name}.bias"] = shape[:1]
    return shapes


def check_stream(records: Iterable[WeightRecord], schema: tuple[dict, set] | None, source: str, *,
                 dtypes: Mapping[str, torch.dtype] | None = None,
                 upfront: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass `(name, tensor)` on, raising LoadError naming file and tensor for a duplicate, unexpected, mis-shaped or
    (with `dtypes`) mistyped tensor, and for a missing one. Without a schema only duplicates and non-tensors are
    caught. A schema shape of None is not checked here (a quantization method's weight loader checks it).

    With `upfront` (streams of `LazyTensor`s, whose records hold no data) every record is checked before the first
    is passed on, so a corrupt checkpoint fails before any tensor is read into the model; otherwise each as it
    comes, and a missing tensor at the end."""
    shapes, optional = schema if schema is not None else (None, set())
    dtypes = dtypes or {}
    seen: dict[str, str] = {}

    def checked(file: str, name: str, tensor: Any) -> bool:
        if name.endswith(IGNORED_SUFFIXES):
            return False
        if not isinstance(tensor, (torch.Tensor, LazyTensor)):
            raise LoadError(f"{file}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
        if name in seen:
            raise LoadError(f"{file}: tensor {name!r} appears twice (also in {seen[name]})")
        seen[name] = file
        if shapes is not None:
            if name not in shapes:
                hint = (" (a quantized checkpoint's tensor: does config.json carry its quantization_config, and is "
                        "`quantization` auto?)" if name.endswith(QUANT_SUFFIXES) else "")
                raise LoadError(f"{file}: unexpected tensor {name!r}; the checkpoint does not match the "
                                f"architecture in the model config{hint}")
            if shapes[name] is not None and tuple(tensor.shape) != tuple(shapes[name]):
                raise LoadError(f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, the model config "
                                f"expects {tuple(shapes[name])}")
        want = dtypes.get(name)
        if want is not None and tensor.dtype != want:
            raise LoadError(f"{file}: tensor {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}, the "
                            f"checkpoint's quantization_config expects {str(want).removeprefix('torch.')}")
        return True

    def check_missing() -> None:
        if shapes is None:
            return
        missing = sorted(set(shapes) - set(seen) - optional)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise LoadError(f"{source}: missing tensor(s) {shown}; the checkpoint is incomplete or for a "
                            f"different architecture")

    if upfront:
        records = [r for r in records if checked(*r)]
        check_missing()
        for _, name, tensor in records:
            yield name, tensor
        return
    for file, name, tensor in records:
        if checked(file, name, tensor):
            yield name, tensor
    check_missing()


class FileLoader(ModelLoader):
    """A loader for one on-disk format. Subclasses implement `iter_sourced`."""

    lazy_records: ClassVar[bool] = False
    """True when `iter_sourced` yields only `LazyTensor`s (no data read until asked): the whole stream is then
    checked against the schema before any tensor is loaded."""

    @abstractmethod
    def iter_sourced(self, path: str) -> Iterator[WeightRecord]:
        """Yield `(file, checkpoint_name, tensor or LazyTensor)` one tensor at a time."""

    def iter_weights(self, path: str) -> Iterator[tuple[str, torch.Tensor]]:
        for _, name, tensor in self.iter_sourced(path):
            yield name, materialize(tensor)

    def checked_weights(self, path: str, hf_config: Any = None, lazy: bool = False,
                        model: torch.nn.Module | None = None) -> Iterator[tuple[str, torch.Tensor | LazyTensor]]:
        """`iter_weights` checked against the config's expected tensors (see `check_stream`); with `lazy`, tensors
        the format can read in part come as `LazyTensor`s. With `model`, the expected tensors are those of its
        attached quantization methods (`weavelm.core.quantization.checkpoint_schema`)."""
        cfg = hf_config if hf_config is not None else self.load_hf_config(path)
        schema, dtypes = expected_tensors(cfg), None
        if schema is not None and model is not None:
            from weavelm.core.quantization import checkpoint_schema

            declared = checkpoint_schema(model, *schema)
            schema, dtypes = (declared.shapes, declared.optional), declared.dtypes
        stream = check_stream(self.iter_sourced(path), schema, source=path, dtypes=dtypes,
                              upfront=lazy and self.lazy_records)
        return stream if lazy else ((name, materialize(tensor)) for name, tensor in stream)

    def load_weights(self, model: ModelArchitecture, path: str) -> None:
        from weavelm.core.model_files import load_into_model

        load_into_model(model, self.checked_weights(path, self._config_of(model, path), lazy=True, model=model),
                        source=path)

    def check_checkpoint(self, model: ModelArchitecture, path: str) -> None:
        """Check the whole checkpoint at `path` against `model`'s expected tensors (with its quantization methods'
        declared ones): names, shapes, dtypes and missing tensors, from the file headers alone. Called by the
        loading code after the methods are attached and before the model's memory is allocated, so a corrupt
        checkpoint costs nothing; a no-op for formats whose records carry data (checked as they load)."""
        if self.lazy_records:
            next(iter(self.checked_weights(path, self._config_of(model, path), lazy=True, model=model)), None)

    def _config_of(self, model: ModelArchitecture, path: str) -> Any:
        cfg = getattr(model, "hf_config", None) or getattr(model, "config", None)
        return cfg if cfg is not None and hasattr(cfg, "model_type") else self.load_hf_config(path)
