"""`weavelm convert SRC DST --to safetensors|pt|gguf|tensorizer`: rewrite a model's weights in another format.

The source is read by whichever loader `auto` picks (so any supported format converts to any other), checked
against the config's expected tensors, and written one tensor (or one shard) at a time. Directory outputs get
`config.json` and the tokenizer files beside the weights; a GGUF output carries config and tokenizer in its metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Iterable, Iterator

import torch

from weavelm.errors import LoadError, WeaveError

FORMATS = ("safetensors", "pt", "gguf", "tensorizer")
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
              "chat_template.jinja")
DEFAULT_SHARD = 4 * 1024 ** 3


def convert(src_path: str, dst_path: str, to: str, gguf_type: str = "F16", *, shard_size: int = DEFAULT_SHARD,
            dtype: str | None = None, passphrase_env: str | None = None) -> str:
    """Convert the model at `src_path` into format `to` at `dst_path`; returns the path written.

    `gguf_type`: F32, F16 or Q8_0 (with `to="gguf"`). `shard_size`: bytes per safetensors / pt shard (an index file
    is written when there is more than one). `dtype`: cast floating tensors first (e.g. "float16").
    `passphrase_env`: encrypt a tensorizer file with the passphrase in that environment variable.
    """
    from weavelm.core.registry import Registry

    if to not in FORMATS:
        raise LoadError(f"--to: unknown format {to!r}; choose one of {', '.join(FORMATS)}")
    if os.path.abspath(src_path) == os.path.abspath(dst_path):
        raise LoadError("convert: SRC and DST are the same path; write the converted model elsewhere")
    registry = Registry.load()
    auto = registry.get("loader", "auto")
    loader = auto.select(auto.Options(), registry.classes("loader")).resolve(src_path)
    cfg = loader.load_hf_config(src_path)
    weights = loader.checked_weights(src_path, cfg) if hasattr(loader, "checked_weights") else \
        loader.iter_weights(src_path)
    weights = cast(weights, getattr(torch, dtype) if dtype else None)
    src_dir = src_path if os.path.isdir(src_path) else os.path.dirname(os.path.abspath(src_path))

    if to == "gguf":
        from weavelm.plugins.loaders.gguf_writer import write_gguf

        file = dst_path if dst_path.endswith(".gguf") else os.path.join(dst_path, f"model-{gguf_type}.gguf")
        os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
        tok_dir = src_dir if os.path.isfile(os.path.join(src_dir, "tokenizer.json")) else \
            save_tokenizer(loader, src_path, file + ".tokenizer")
        try:
            return write_gguf(file, cfg, weights, gguf_type, tokenizer_dir=tok_dir,
                              name=os.path.basename(os.path.normpath(src_path)))
        finally:
            if tok_dir and tok_dir.endswith(".tokenizer"):
                shutil.rmtree(tok_dir, ignore_errors=True)

    os.makedirs(dst_path, exist_ok=True)
    copy_side_files(loader, cfg, src_path, src_dir, dst_path)
    if to == "tensorizer":
        return write_tensorizer(os.path.join(dst_path, "model.tensors"), weights, passphrase_env)
    return write_shards(dst_path, weights, to, shard_size)


def cast(weights: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    for name, t in weights:
        yield name, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)


def save_tokenizer(loader, src_path: str, folder: str) -> str | None:
    """Save the source's tokenizer (e.g. one built from GGUF metadata) as Hugging Face files; None if it has none."""
    try:
        tok = loader.load_tokenizer(src_path)
    except WeaveError:
        return None
    if tok is None:
        return None
    tok.save_pretrained(folder)
    return folder


def copy_side_files(loader, cfg, src_path: str, src_dir: str, dst: str) -> None:
    copied = False
    for name in SIDE_FILES:
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst, name))
            copied |= name == "config.json"
    if not copied:  # a GGUF source: config and tokenizer come from its metadata
        cfg.save_pretrained(dst)
        save_tokenizer(loader, src_path, dst)


def write_shards(dst: str, weights: Iterable[tuple[str, torch.Tensor]], to: str, shard_size: int) -> str:
    """safetensors / pt shards of at most `shard_size` bytes (a single tensor may exceed it), HF file names."""
    ext, single, index_name = (("safetensors", "model.safetensors", "model.safetensors.index.json")
                               if to == "safetensors" else ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"))
    stem = single.rsplit(".", 1)[0]
    shards: list[list[str]] = []
    total, buf, buf_bytes = 0, {}, 0

    def flush() -> None:
        nonlocal buf, buf_bytes
        if buf:
            save(os.path.join(dst, f".{stem}-part{len(shards)}.{ext}"), buf, to)
            shards.append(list(buf))
            buf, buf_bytes = {}, 0

    for name, tensor in weights:
        nbytes = tensor.numel() * tensor.element_size()
        if buf and buf_bytes + nbytes > shard_size:
            flush()
        buf[name] = tensor.contiguous()
        buf_bytes += nbytes
        total += nbytes
    flush()
    if len(shards) == 1:
        os.replace(os.path.join(dst, f".{stem}-part0.{ext}"), os.path.join(dst, single))
        return os.path.join(dst, single)
    weight_map = {}
    for i, names in enumerate(shards):
        final = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}"
        os.replace(os.path.join(dst, f".{stem}-part{i}.{ext}"), os.path.join(dst, final))
        weight_map.update({n: final for n in names})
    with open(os.path.join(dst, index_name), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return os.path.join(dst, index_name)


def save(file: str, tensors: dict[str, torch.Tensor], to: str) -> None:
    if to == "safetensors":
        from safetensors.torch import save_file
        save_file(tensors, file, metadata={"format": "pt"})
    else:
        torch.save(tensors, file)


def write_tensorizer(file: str, weights: Iterable[tuple[str, torch.Tensor]], passphrase_env: str | None) -> str:
    from tensorizer import TensorSerializer
    from tensorizer.serialization import EncryptionParams, TensorType

    encryption = None
    if passphrase_env:
        passphrase = os.environ.get(passphrase_env)
        if not passphrase:
            raise LoadError(f"--passphrase-env: environment variable {passphrase_env!r} is not set")
        encryption = EncryptionParams.from_string(passphrase)
    writer = TensorSerializer(file, encryption=encryption)
    try:
        for i, (name, tensor) in enumerate(weights):
            writer.write_tensor(i, name, TensorType.STATE_DICT, tensor.contiguous())
    finally:
        writer.close()
    return file


def parse_size(text: str) -> int:
    units = {"KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3, "KIB": 1024, "MIB": 1024 ** 2, "GIB": 1024 ** 3}
    t = text.strip().upper()
    for unit, scale in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * scale)
    return int(t)


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Add `convert` to the CLI's subparsers; its handler is `run_convert`."""
    p = subparsers.add_parser("convert", help="convert a model's weights between formats",
                              description=__doc__.splitlines()[0])
    p.add_argument("src", metavar="SRC", help="model directory, weight file or .gguf file")
    p.add_argument("dst", metavar="DST", help="output directory (or a .gguf file with --to gguf)")
    p.add_argument("--to", required=True, choices=FORMATS, help="output format")
    p.add_argument("--gguf-type", default="F16", choices=("F32", "F16", "Q8_0"), help="GGUF tensor type")
    p.add_argument("--shard-size", default=str(DEFAULT_SHARD), type=parse_size,
                   help="max bytes per safetensors/pt shard, e.g. 2GB (default 4 GiB)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="cast floating tensors first")
    p.add_argument("--passphrase-env", metavar="VAR", help="tensorizer: encrypt with the passphrase in $VAR")
    p.add_argument("--force", action="store_true", help="write into DST even if it exists (files there are "
                   "overwritten)")
    p.set_defaults(handler=run_convert)
    return p


def run_convert(args: argparse.Namespace) -> int:
    if not args.force and os.path.exists(args.dst) and not (os.path.isdir(args.dst) and not os.listdir(args.dst)):
        raise LoadError(f"convert: {args.dst!r} already exists; choose a new output path or pass --force to "
                        f"overwrite it")
    out = convert(args.src, args.dst, args.to, args.gguf_type, shard_size=args.shard_size, dtype=args.dtype,
                  passphrase_env=args.passphrase_env)
    print(out)
    return 0
