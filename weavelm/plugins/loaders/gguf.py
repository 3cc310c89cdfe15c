"""The `gguf` loader: llama.cpp GGUF files (a `.gguf` file, or a directory holding one).

The `gguf` package parses the file and dequantizes; this module maps llama.cpp's tensor names to Hugging Face
checkpoint names, undoes the Q/K row permutation of llama-architecture files, builds the transformers config from
the metadata, and the tokenizer from the metadata when no Hugging Face tokenizer sits beside the file.

Tensors are yielded as `LazyTensor`s over the reader's memory map, so a tensor-parallel rank reads only its shard:
float tensors are sliced along any dimension before the copy; quantized tensors are dequantized only for the rows
of a row (dim 0) shard, but whole and then narrowed for a column shard, since quantization blocks run along a row.
Permuted Q/K rows are sliced by whole heads and unpermuted per head.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from weavelm.core.hookspecs import hookimpl
from weavelm.core.model_files import LazyTensor
from weavelm.core.quantization import QuantizedTensor
from weavelm.errors import LoadError
from weavelm.plugins.loaders import gguf_layout as layout
from weavelm.plugins.loaders.common import FileLoader, WeightRecord
from weavelm.plugins.loaders.gguf_fast_reader import FastGGUFReader

MAGIC = b"GGUF"
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def gguf_file(path: str) -> str:
    """The .gguf file `path` names, or the single .gguf inside the directory `path`."""
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(found) == 1:
            return os.path.join(path, found[0])
        if found:
            raise LoadError(f"{path}: holds several .gguf files ({', '.join(found)}); set `model` to one of them")
    raise LoadError(f"model: {path!r} is neither a .gguf file nor a directory holding one")


def open_reader(file: str) -> Any:
    """A `gguf.GGUFReader` whose tensor table is checked first, so a bad entry is reported by tensor name."""
    from weavelm.errors import require_extra
    require_extra("gguf", "gguf", f"loading {os.path.basename(file)} (a GGUF file)")
    import gguf

    class CheckedReader(gguf.GGUFReader):
        def _build_tensors(self, start_offs: int, fields: list) -> None:
            for field in fields:
                _, name_data, _, dims, raw_type, offset = field.parts
                name = bytes(name_data).decode("utf-8", "replace")
                try:
                    qtype = gguf.GGMLQuantizationType(int(raw_type[0]))
                except ValueError:
                    raise LoadError(f"{file}: tensor {name!r} has unknown ggml type id {int(raw_type[0])}; the "
                                    f"file is corrupt or newer than the installed gguf package") from None
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                n = int(np.prod(dims))
                end = int(start_offs + offset[0]) + n * type_size // block
                if n % block or end > len(self.data):
                    raise LoadError(f"{file}: tensor {name!r} ({qtype.name}, shape {dims.tolist()}) ends at byte "
                                    f"{end} but the file has {len(self.data)} bytes; the file is truncated or its "
                                    f"header corrupt")
            super()._build_tensors(start_offs, fields)

    with open(file, "rb") as f:
        magic = f.read(4)
    if magic != MAGIC:
        raise LoadError(f"{file}: not a GGUF file (magic {magic!r}, expected {MAGIC!r}); the header is corrupt")
    try:
        return FastGGUFReader(file)
    except Exception:  # anything unusual: the full reader below checks it and says what is wrong
        pass
    try:
        return CheckedReader(file)
    except LoadError:
        raise
    except Exception as e:  # the reader raises ValueError, IndexError, UnicodeDecodeError, ... on corruption
        raise LoadError(f"{file}: GGUF header cannot be parsed ({type(e).__name__}: {e}); the file is truncated "
                        f"or corrupt") from e


def metadata(reader: Any) -> dict[str, Any]:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def hf_shape(t: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def to_torch(file: str, t: Any, dim: int | None = None, start: int = 0, length: int = 0) -> torch.Tensor:
    """One GGUF tensor as a torch tensor in Hugging Face shape (or its slice `start:start + length` along `dim`,
    read from the memory map alone): F32/F16/BF16 exact, quantized types as float32. A quantized tensor is sliced
    along its rows only (`dim` < its last dimension)."""
    import gguf

    kind = t.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise LoadError(f"{file}: tensor {t.name!r} is stored as {kind}, which this loader does not dequantize; "
                        f"supported: {', '.join(SUPPORTED_TYPES)}. Re-quantize the model with llama.cpp")
    shape = list(hf_shape(t))
    data = t.data.view(np.int16) if kind == "BF16" else t.data
    if dim is not None:
        data = data.reshape(shape[:-1] + [data.shape[-1]])[(slice(None),) * dim + (slice(start, start + length),)]
        shape[dim] = length
    if kind in FLOAT_DTYPES:
        return torch.from_numpy(np.array(data, copy=True)).view(FLOAT_DTYPES[kind]).reshape(shape)
    return torch.from_numpy(gguf.quants.dequantize(data, t.tensor_type)).reshape(shape)


def lazy_tensor(file: str, t: Any, n_head: int | None) -> LazyTensor:
    """`t` as a LazyTensor; `n_head`: the Q/K head count whose rows llama.cpp permuted (None: stored as is)."""
    shape, kind = hf_shape(t), t.tensor_type.name
    if n_head is not None and shape[0] % (2 * n_head):
        raise LoadError(f"{file}: tensor {t.name!r} has {shape[0]} rows, not a multiple of 2 x {n_head} heads; it "
                        f"does not match the metadata")
    head_rows = shape[0] // n_head if n_head else 1

    def whole() -> torch.Tensor:
        tensor = to_torch(file, t)
        return layout.unpermute(tensor, n_head) if n_head is not None else tensor

    def read(dim: int | None, start: int, length: int) -> torch.Tensor:
        if dim is None:
            return whole()
        rows_ok = kind in FLOAT_DTYPES or dim < len(shape) - 1
        heads_ok = n_head is None or (dim == 0 and start % head_rows == 0 and length % head_rows == 0)
        if not (rows_ok and heads_ok):
            return whole().narrow(dim, start, length)
        part = to_torch(file, t, dim, start, length)
        return layout.unpermute(part, length // head_rows) if n_head is not None else part

    if kind in FLOAT_DTYPES:
        return LazyTensor(shape, FLOAT_DTYPES[kind], read)

    def raw_rows() -> np.ndarray:
        rows = np.asarray(t.data).reshape(shape[0], -1)
        if n_head is None:
            return rows
        return rows.reshape(n_head, shape[0] // n_head // 2, 2, -1).swapaxes(1, 2).reshape(rows.shape)

    return QuantizedTensor(shape, torch.float32, read, kind, raw_rows)


class GGUFLoader(FileLoader):
    name = "gguf"
    description = "llama.cpp GGUF (F32/F16/BF16, Q4_0..Q8_0, Q2_K..Q6_K) with config and tokenizer from metadata."

    @classmethod
    def detect(cls, path: str) -> str | None:
        try:
            file = gguf_file(path)
            with open(file, "rb") as f:
                return f"GGUF magic in {os.path.basename(file)}" if f.read(4) == MAGIC else None
        except (LoadError, OSError):
            return None

    def __init__(self, options: Any):
        super().__init__(options)
        self._readers: dict[tuple, Any] = {}  # parsed headers, until the weights are read

    def reader(self, file: str, keep: bool = True) -> Any:
        """The parsed file, kept between `load_hf_config`, `load_tokenizer` and `iter_weights` (parsing a large
        vocabulary takes seconds; an engine uses one loader in each process, so the frontend's reads serve the
        runner's load), keyed by path, mtime and size; `iter_weights` releases it so the mapped pages do not
        outlive the load."""
        st = os.stat(file)
        key = (os.path.realpath(file), st.st_mtime_ns, st.st_size)
        reader = self._readers.pop(key, None) or open_reader(file)
        if keep:
            while len(self._readers) >= 2:
                self._readers.pop(next(iter(self._readers)))
            self._readers[key] = reader
        return reader

    def load_hf_config(self, path: str) -> Any:
        file = gguf_file(path)
        reader = self.reader(file)
        return layout.config_from_metadata(metadata(reader), {t.name for t in reader.tensors}, file)

    def load_tokenizer(self, path: str) -> Any:
        from transformers import AutoTokenizer

        file = gguf_file(path)
        folder = os.path.dirname(os.path.abspath(file))
        has_hf = any(os.path.isfile(os.path.join(folder, f)) for f in HF_TOKENIZER_FILES)
        if not has_hf and "tokenizer.ggml.model" not in self.reader(file).fields:
            return None  # no tokenizer anywhere: token-id prompts only
        try:
            if has_hf:
                return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
            return AutoTokenizer.from_pretrained(folder, gguf_file=os.path.basename(file), local_files_only=True,
                                                 trust_remote_code=False)
        except Exception as e:  # transformers raises many types for a tokenizer it cannot build
            raise LoadError(f"{file}: cannot build a tokenizer from its metadata or the files beside it ({e})") from e

    def weight_types(self, path: str) -> dict[str, str]:
        """Stored ggml type of every tensor, by Hugging Face name (what `quantization: auto` decides from)."""
        reader = self.reader(gguf_file(path))
        return {layout.gguf_to_hf_name(t.name) or t.name: t.tensor_type.name for t in reader.tensors}

    def checkpoint_num_elements(self, path: str) -> int | None:
        """Elements summed over the tensors at `path`, read from the GGUF tensor table without loading tensor data
        (a quantized tensor counts the elements of its logical, dequantized shape)."""
        return sum(int(t.n_elements) for t in self.reader(gguf_file(path)).tensors)

    def iter_sourced(self, path: str) -> Iterator[WeightRecord]:
        file = gguf_file(path)
        reader = self.reader(file, keep=False)
        md = metadata(reader)
        names = {t.name for t in reader.tensors}
        cfg = layout.config_from_metadata(md, names, file)
        arch = md["general.architecture"]
        for t in reader.tensors:  # fail before any weight is read
            if t.tensor_type.name not in SUPPORTED_TYPES:
                to_torch(file, t)
            if layout.gguf_to_hf_name(t.name) is None:
                raise LoadError(f"{file}: unexpected tensor {t.name!r}: not a llama.cpp {arch} tensor this loader "
                                f"maps")
        for t in reader.tensors:
            hf_name = layout.gguf_to_hf_name(t.name)
            yield file, hf_name, lazy_tensor(file, t, layout.qk_heads(arch, hf_name, cfg))


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("loader", GGUFLoader.name, GGUFLoader)
