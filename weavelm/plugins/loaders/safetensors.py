"""The `safetensors` loader: single files and sharded checkpoints (`model.safetensors.index.json`).

The safetensors library validates each file; each tensor is then yielded as a `LazyTensor` and read, when the model
asks, with plain reads into a fresh buffer rather than through a memory map, so pages of the file never count
against the process: peak host memory is the model plus the largest tensor, not the model plus the file. A
tensor-parallel rank reads only its shard: one contiguous read for a slice of rows (dim 0), one read per row for a
slice of columns.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator

import torch

from weavelm.core.hookspecs import hookimpl
from weavelm.core.model_files import LazyTensor
from weavelm.errors import LoadError
from weavelm.plugins.loaders.common import IGNORED_SUFFIXES, FileLoader, WeightRecord, weight_files

INDEX = "model.safetensors.index.json"
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER = 100 * 1024 * 1024


def read_header(file: str) -> tuple[int, dict[str, dict]]:
    """`(data_start, name -> {dtype, shape, data_offsets})`, with each tensor's span checked against the file size.

    Raises LoadError naming the file, and the tensor when one is at fault (truncation, wrong size, bad dtype).
    """
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(MAX_HEADER, size - 8):
            raise LoadError(f"{file}: not a safetensors file or its header is corrupt (header length {n}, file "
                            f"size {size}); re-download or re-convert it")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise LoadError(f"{file}: safetensors header is corrupt ({e}); re-download or re-convert it") from e
    header.pop("__metadata__", None)
    data_start, data_size = 8 + n, size - 8 - n
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            nbytes = math.prod(shape) * dtype.itemsize
        except (KeyError, TypeError, ValueError) as e:
            raise LoadError(f"{file}: tensor {name!r} has a corrupt header entry {info!r}") from e
        if end - begin != nbytes or begin < 0:
            raise LoadError(f"{file}: tensor {name!r} spans bytes {begin}..{end} but dtype {info['dtype']} and "
                            f"shape {shape} need {nbytes}; the header is corrupt")
        if end > data_size:
            raise LoadError(f"{file}: tensor {name!r} ends at byte {data_start + end} but the file has {size} "
                            f"bytes; the file is truncated")
    return data_start, header


def validate(file: str) -> tuple[int, dict[str, dict]]:
    """Our header read (names the tensor at fault) followed by the library's own validation."""
    from safetensors import safe_open

    parsed = read_header(file)
    try:
        with safe_open(file, framework="pt") as f:
            f.keys()
    except Exception as e:  # the library raises SafetensorError and others
        raise LoadError(f"{file}: rejected by safetensors ({e}); re-download or re-convert it") from e
    return parsed


def read_slice(file: str, offset: int, name: str, info: dict, dim: int | None, start: int,
               length: int) -> torch.Tensor:
    """Tensor `name` (its data at byte `offset` of `file`), or its slice `start:start + length` along `dim`, in a
    fresh buffer: `prod(shape[:dim])` reads of the slice's contiguous runs."""
    shape, dtype = list(info["shape"]), DTYPES[info["dtype"]]
    out_shape, runs, run, stride, skip = shape, 1, math.prod(shape) * dtype.itemsize, 0, 0
    if dim is not None:
        inner = math.prod(shape[dim + 1:]) * dtype.itemsize
        out_shape = shape[:dim] + [length] + shape[dim + 1:]
        runs, run, stride, skip = math.prod(shape[:dim]), length * inner, shape[dim] * inner, start * inner
    tensor = torch.empty(out_shape, dtype=dtype)
    if run == 0 or runs == 0:
        return tensor
    buf = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    with open(file, "rb", buffering=0) as f:
        for i in range(runs):
            f.seek(offset + i * stride + skip)
            if f.readinto(buf[i * run:(i + 1) * run]) != run:
                raise LoadError(f"{file}: tensor {name!r} could not be read in full; the file is truncated")
    return tensor


def lazy_tensors(file: str) -> Iterator[tuple[str, LazyTensor]]:
    """Each tensor of a validated file, in file order, as a LazyTensor read from the file when asked."""
    data_start, header = validate(file)
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        offset = data_start + info["data_offsets"][0]

        def read(dim, start, length, name=name, info=info, offset=offset):
            return read_slice(file, offset, name, info, dim, start, length)

        yield name, LazyTensor(info["shape"], DTYPES[info["dtype"]], read)

PACKED_INT4 = (".qweight", ".qzeros", ".weight_packed", ".weight_zero_point")  # int32 words of eight int4 values

class SafetensorsLoader(FileLoader):
    name = "safetensors"
    description = "Hugging Face safetensors, single or sharded; streams one tensor at a time with low peak memory."
    lazy_records = True  # headers only until a tensor is asked for: the whole checkpoint is checked first

    @classmethod
    def detect(cls, path: str) -> str | None:
        if os.path.isfile(path):
            return "a .safetensors file" if path.endswith(".safetensors") else None
        if os.path.isfile(os.path.join(path, INDEX)):
            return f"{INDEX} (sharded safetensors)"
        if os.path.isdir(path) and any(f.endswith(".safetensors") for f in os.listdir(path)):
            return "*.safetensors files"
        return None

    def checkpoint_num_elements(self, path: str) -> int | None:
        """Elements (product of the logical shape) summed over the checkpoint's tensors at `path`, read from
        the file headers without loading tensor data; rotary `inv_freq` buffers are not counted, and int4 words
        packed eight to an int32 (GPTQ / AWQ / compressed-tensors) count as eight."""
        files = weight_files(path, single=("model.safetensors",), index=INDEX, suffixes=(".safetensors",),
                             fmt="safetensors")
        return sum(math.prod(info["shape"]) * (8 if name.endswith(PACKED_INT4) else 1) for file in files
                   for name, info in read_header(file)[1].items() if not name.endswith(IGNORED_SUFFIXES))

    def iter_sourced(self, path: str) -> Iterator[WeightRecord]:
        files = weight_files(path, single=("model.safetensors",), index=INDEX, suffixes=(".safetensors",),
                             fmt="safetensors")
        for file in files:
            for name, tensor in lazy_tensors(file):
                yield file, name, tensor


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("loader", SafetensorsLoader.name, SafetensorsLoader)
