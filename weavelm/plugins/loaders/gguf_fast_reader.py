"""A fast GGUF header reader: the metadata and tensor table parsed with `struct` from one read of the header, the
tensor data as views of one memory map.

`gguf.GGUFReader` builds a numpy memmap view per field part (a 49k-token vocabulary is ~250k views, seconds on
these CPUs); this reader gives the same `fields[key].contents()` and `tensors` (name, tensor_type, shape,
n_elements, data) the loader uses, in tens of milliseconds. It raises ValueError on anything unexpected; the
loader then falls back to `gguf.GGUFReader`, whose checks produce the detailed error messages.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
FLOAT_ITEMS = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
               "I32": np.int32, "I64": np.int64}


@dataclass
class Field:
    value: Any

    def contents(self) -> Any:
        return self.value


@dataclass
class Tensor:
    name: str
    tensor_type: Any
    shape: np.ndarray
    n_elements: int
    data: np.ndarray


class FastGGUFReader:
    def __init__(self, path: str):
        import gguf

        self.data = np.memmap(path, mode="r", dtype=np.uint8)
        buf = memoryview(self.data)
        pos = 0

        def take(fmt: str) -> Any:
            nonlocal pos
            value = struct.unpack_from(fmt, buf, pos)[0]
            pos += struct.calcsize(fmt)
            return value

        def string() -> str:
            nonlocal pos
            n = take("<Q")
            if pos + n > len(buf):
                raise ValueError("string past the end of the file")
            s = bytes(buf[pos:pos + n]).decode("utf-8")
            pos += n
            return s

        def value(vtype: int) -> Any:
            nonlocal pos
            if vtype == STRING:
                return string()
            if vtype == ARRAY:
                itype, count = take("<I"), take("<Q")
                if itype == STRING:
                    return [string() for _ in range(count)]
                if itype in SCALARS:
                    fmt = SCALARS[itype]
                    size = struct.calcsize(fmt)
                    out = list(struct.unpack_from(f"<{count}{fmt[1]}", buf, pos))
                    pos += size * count
                    return out
                return [value(itype) for _ in range(count)]
            if vtype not in SCALARS:
                raise ValueError(f"unknown value type {vtype}")
            return take(SCALARS[vtype])

        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("bad magic")
        pos = 4
        version = take("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}")
        n_tensors, n_kv = take("<Q"), take("<Q")
        self.fields: dict[str, Field] = {}
        for _ in range(n_kv):
            key = string()
            self.fields[key] = Field(value(take("<I")))
        infos = []
        for _ in range(n_tensors):
            name = string()
            n_dims = take("<I")
            dims = [take("<Q") for _ in range(n_dims)]
            infos.append((name, dims, take("<I"), take("<Q")))
        align = int(self.fields.get("general.alignment", Field(32)).value)
        start = (pos + align - 1) // align * align
        self.tensors: list[Tensor] = []
        seen = set()
        for name, dims, raw_type, offset in infos:
            if name in seen:
                raise ValueError(f"duplicate tensor {name}")
            seen.add(name)
            qtype = gguf.GGMLQuantizationType(raw_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n = int(np.prod(dims)) if dims else 1
            np_dims = tuple(reversed(dims))
            begin = start + offset
            if qtype.name in FLOAT_ITEMS:
                item = np.dtype(FLOAT_ITEMS[qtype.name])
                count = n
            else:
                item, count = np.dtype(np.uint8), n * type_size // block
                np_dims = np_dims[:-1] + (np_dims[-1] // block * type_size,)
            end = begin + count * item.itemsize
            if n % block or end > len(self.data):
                raise ValueError(f"tensor {name} out of bounds")
            data = self.data[begin:end].view(item).reshape(np_dims)
            self.tensors.append(Tensor(name, qtype, np.array(dims, dtype=np.uint64), n, data))
