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
from collections.abc import Iterable, Iterator
from typing import Any

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


def check_stream(records: Iterable[WeightRecord], schema: tuple[dict, set] | None,
                 source: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass `(name, tensor)` on, raising LoadError naming file and tensor for a duplicate, unexpected or mis-shaped
    tensor, and at the end for a missing one. Without a schema only duplicates and non-tensors are caught."""
    shapes, optional = schema if schema is not None else (None, set())
    seen: dict[str, str] = {}
    for file, name, tensor in records:
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if not isinstance(tensor, (torch.Tensor, LazyTensor)):
            raise LoadError(f"{file}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
        if name in seen:
            raise LoadError(f"{file}: tensor {name!r} appears twice (also in {seen[name]})")
        seen[name] = file
        if shapes is not None:
            if name not in shapes:
                raise LoadError(f"{file}: unexpected tensor {name!r}; the checkpoint does not match the "
                                f"architecture in the model config")
            if tuple(tensor.shape) != shapes[name]:
                raise LoadError(f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, the model config "
                                f"expects {shapes[name]}")
        yield name, tensor
    if shapes is not None:
        missing = sorted(set(shapes) - set(seen) - optional)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise LoadError(f"{source}: missing tensor(s) {shown}; the checkpoint is incomplete or for a "
                            f"different architecture")


class FileLoader(ModelLoader):
    """A loader for one on-disk format. Subclasses implement `iter_sourced`."""

    @abstractmethod
    def iter_sourced(self, path: str) -> Iterator[WeightRecord]:
        """Yield `(file, checkpoint_name, tensor or LazyTensor)` one tensor at a time."""

    def iter_weights(self, path: str) -> Iterator[tuple[str, torch.Tensor]]:
        for _, name, tensor in self.iter_sourced(path):
            yield name, materialize(tensor)

    def checked_weights(self, path: str, hf_config: Any = None,
                        lazy: bool = False) -> Iterator[tuple[str, torch.Tensor | LazyTensor]]:
        """`iter_weights` checked against the config's expected tensors (see `check_stream`); with `lazy`, tensors
        the format can read in part come as `LazyTensor`s."""
        cfg = hf_config if hf_config is not None else self.load_hf_config(path)
        stream = check_stream(self.iter_sourced(path), expected_tensors(cfg), source=path)
        return stream if lazy else ((name, materialize(tensor)) for name, tensor in stream)

    def load_weights(self, model: ModelArchitecture, path: str) -> None:
        from weavelm.core.model_files import load_into_model

        cfg = getattr(model, "hf_config", None) or getattr(model, "config", None)
        if cfg is None or not hasattr(cfg, "model_type"):
            cfg = self.load_hf_config(path)
        if any(getattr(getattr(m, "quant_method", None), "checks_own_tensors", False) for m in model.modules()):
            # int4 layers store other tensors than the dense schema's (qweight, scales, ...); their weight loaders
            # check each one's shape and dtype, and load_into_model reports any that is missing
            stream = check_stream(self.iter_sourced(path), None, source=path)
            load_into_model(model, stream, source=path)
            return
        load_into_model(model, self.checked_weights(path, cfg, lazy=True), source=path)
