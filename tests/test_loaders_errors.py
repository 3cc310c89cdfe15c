"""Broken and hostile weight files: each gives a LoadError that names the file and, where the format lets a reader
know it, the tensor. Nothing from a file is executed.

A PyTorch zip archive keeps its directory at the end, so a truncated or flipped `.pt` cannot be read at all and its
error names the file only; every other case names the tensor too.
"""

from __future__ import annotations

import os
import shutil
import struct

import numpy as np
import pytest
import torch

from tests.gguf_fixtures import model_zoo, state_dict
from tests.gguf_writer_util import write_llama_cpp_gguf
from weavelm.core.registry import Registry
from weavelm.errors import LoadError

FORMATS = ("safetensors", "pt", "tensorizer", "gguf")
VICTIM = "model.layers.1.mlp.up_proj.weight"
VICTIM_GGUF = "blk.1.ffn_up.weight"
FILE_NAMES = {"safetensors": "model.safetensors", "pt": "pytorch_model.bin", "tensorizer": "model.tensors",
              "gguf": "model.gguf"}


def load_all(fmt: str, path: str) -> None:
    cls = Registry.load().get("loader", fmt)
    list(cls(cls.Options()).checked_weights(path))


def write_model(fmt: str, folder, sd: dict[str, torch.Tensor], **gguf_kw) -> str:
    """`sd` saved in `fmt` with the fixture's config.json; returns the weight file."""
    from transformers import AutoConfig

    src = model_zoo("llama")["safetensors"]
    os.makedirs(folder, exist_ok=True)
    file = os.path.join(folder, FILE_NAMES[fmt])
    if fmt == "gguf":
        return write_llama_cpp_gguf(file, AutoConfig.from_pretrained(src), sd, "F32", **gguf_kw)
    shutil.copy(os.path.join(src, "config.json"), folder)
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(sd, file)
    elif fmt == "pt":
        torch.save(sd, file)
    else:
        from tensorizer import TensorSerializer
        writer = TensorSerializer(file)
        writer.write_state_dict(sd)
        writer.close()
    return file


def good_sd() -> dict[str, torch.Tensor]:
    return state_dict(model_zoo("llama")["safetensors"])


def expect(fmt: str, file: str, *needles: str) -> str:
    with pytest.raises(LoadError) as info:
        load_all(fmt, file if fmt == "gguf" else os.path.dirname(file))
    msg = str(info.value)
    assert file in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_tensor(fmt, tmp_path):
    sd = good_sd()
    if fmt == "gguf":
        file = write_model(fmt, tmp_path, sd, drop=(VICTIM_GGUF,))
    else:
        del sd[VICTIM]
        file = write_model(fmt, tmp_path, sd)
    with pytest.raises(LoadError, match="missing tensor.*" + VICTIM.replace(".", r"\.")) as info:
        load_all(fmt, file if fmt == "gguf" else str(tmp_path))
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_unexpected_tensor(fmt, tmp_path):
    sd = good_sd()
    if fmt == "gguf":
        file = write_model(fmt, tmp_path, sd, extra={"blk.0.attn_foo.weight": np.zeros((4, 4))})
        expect(fmt, file, "unexpected tensor", "blk.0.attn_foo.weight")
    else:
        sd["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4)
        file = write_model(fmt, tmp_path, sd)
        expect(fmt, file, "unexpected tensor", "model.layers.0.mlp.extra_proj.weight")


@pytest.mark.parametrize("fmt", FORMATS)
def test_shape_mismatch(fmt, tmp_path):
    sd = good_sd()
    sd[VICTIM] = torch.zeros(256, 256)
    file = write_model(fmt, tmp_path, sd)
    expect(fmt, file, VICTIM, "(256, 256)", "(512, 256)")


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_file(fmt, tmp_path):
    file = write_model(fmt, tmp_path, good_sd())
    data = open(file, "rb").read()
    with open(file, "wb") as f:
        f.write(data[: len(data) * 2 // 3])
    msg = expect(fmt, file, "truncated")
    if fmt != "pt":
        assert "model." in msg or "blk." in msg, msg  # names the first tensor that does not fit


def flip(file: str, pos: int, mask: int = 0xFF) -> None:
    with open(file, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ mask]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_flipped_header_bytes(fmt, tmp_path):
    sd = good_sd()
    file = write_model(fmt, tmp_path, sd)
    data = open(file, "rb").read()
    if fmt == "safetensors":  # one bit of the shape in VICTIM's header entry: [512,256] -> [712,256]
        entry = data.index(VICTIM.encode())
        flip(file, data.index(b"[512,", entry) + 1, 0x02)
        expect(fmt, file, VICTIM, "corrupt")
    elif fmt == "gguf":  # the ggml type id in VICTIM's tensor-info record
        at = data.index(VICTIM_GGUF.encode()) + len(VICTIM_GGUF)
        n_dims = struct.unpack_from("<I", data, at)[0]
        flip(file, at + 4 + 8 * n_dims)
        expect(fmt, file, VICTIM_GGUF, "unknown ggml type")
    elif fmt == "tensorizer":  # a byte of VICTIM's stored data: its CRC no longer matches
        flip(file, data.index(sd[VICTIM].numpy().tobytes()[:64]) + 5)
        expect(fmt, file, VICTIM)
    else:  # the zip signature of the archive's first entry
        flip(file, 0)
        expect(fmt, file, "corrupt")
    # and a flipped magic / header-length byte is caught up front
    file2 = write_model(fmt, tmp_path / "magic", sd)
    flip(file2, 2)
    expect(fmt, file2)


def test_unsupported_gguf_type(tmp_path):
    file = write_model("gguf", tmp_path, good_sd(), force_types={VICTIM_GGUF: "IQ4_NL"})
    expect("gguf", file, VICTIM_GGUF, "IQ4_NL", "Q4_K")


def test_pt_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    sd = good_sd()
    sd["model.layers.0.mlp.gate_proj.weight"] = Payload()
    file = tmp_path / "pytorch_model.bin"
    torch.save(sd, file)
    shutil.copy(os.path.join(model_zoo("llama")["safetensors"], "config.json"), tmp_path)
    with pytest.raises(LoadError, match="refused to unpickle") as info:
        load_all("pt", str(tmp_path))
    assert str(file) in str(info.value) and "system" in str(info.value)
    assert not marker.exists()


def test_engine_reports_load_error(tmp_path):
    from weavelm import LLM

    sd = good_sd()
    del sd[VICTIM]
    write_model("safetensors", tmp_path, sd)
    with pytest.raises(LoadError, match=VICTIM.replace(".", r"\.")):
        LLM(model=str(tmp_path), dtype="float32", device="cpu")
