"""The `tensorizer` loader: a model serialized by `weavelm convert --to tensorizer` with CoreWeave's tensorizer
(`model.tensors` beside `config.json`), read lazily one tensor at a time, CRC-checked, optionally encrypted.

Tensorizer has no partial read of a tensor (its CRC covers the whole tensor), so a tensor-parallel rank reads each
whole tensor and copies only its shard; the stream holds one tensor at a time.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator

from pydantic import BaseModel, ConfigDict, Field

from weavelm.core.hookspecs import hookimpl
from weavelm.errors import LoadError
from weavelm.plugins.loaders.common import IGNORED_SUFFIXES, FileLoader, WeightRecord

logger = logging.getLogger("weavelm.loaders")
MAGIC = b"|TZR|"
FILE_NAME = "model.tensors"


class TensorizerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    passphrase_env: str | None = Field(None, description="Name of the environment variable holding the passphrase "
                                       "the file was encrypted with (never the passphrase itself in YAML).")
    verify_hash: bool = Field(True, description="Check every tensor's CRC32 as it is read (catches corruption).")


def tensors_file(path: str) -> str:
    if os.path.isfile(path):
        return path
    file = os.path.join(path, FILE_NAME)
    if os.path.isfile(file):
        return file
    raise LoadError(f"model: {path!r} has no {FILE_NAME}; write one with `weavelm convert SRC DST --to tensorizer`")


class TensorizerLoader(FileLoader):
    name = "tensorizer"
    description = "CoreWeave tensorizer files (model.tensors), streamed lazily with CRC checks; optional encryption."
    Options = TensorizerOptions

    @classmethod
    def detect(cls, path: str) -> str | None:
        try:
            file = tensors_file(path)
            with open(file, "rb") as f:
                return f"tensorizer header in {os.path.basename(file)}" if f.read(5) == MAGIC else None
        except (LoadError, OSError):
            return None

    def decryption(self, file: str):
        env = self.options.passphrase_env
        if env is None:
            return None
        from tensorizer.serialization import DecryptionParams

        passphrase = os.environ.get(env)
        if not passphrase:
            raise LoadError(f"loader.passphrase_env: environment variable {env!r} is not set; set it to the "
                            f"passphrase {file} was encrypted with")
        return DecryptionParams.from_string(passphrase)

    def checkpoint_num_elements(self, path: str) -> int | None:
        """Elements (product of the logical shape) summed over the checkpoint's tensors at `path`, read from
        the tensor headers without loading tensor data; rotary `inv_freq` buffers are not counted."""
        from tensorizer import TensorDeserializer

        try:
            with TensorDeserializer(tensors_file(path), device="cpu", lazy_load=True, verify_hash=False) as reader:
                entries = reader._metadata.values()  # tensorizer has no public per-tensor shape API
                return sum(math.prod(e.shape) for e in entries if not str(e.name).endswith(IGNORED_SUFFIXES))
        except Exception as e:  # encrypted headers, a changed private API: leave the checks to the load
            logger.debug("tensorizer: no element count for %s (%s: %s)", path, type(e).__name__, e)
            return None

    def iter_sourced(self, path: str) -> Iterator[WeightRecord]:
        from tensorizer import TensorDeserializer

        file = tensors_file(path)
        with open(file, "rb") as f:
            if f.read(5) != MAGIC:
                raise LoadError(f"{file}: not a tensorizer file (no {MAGIC!r} header); the header is corrupt")
        last = None
        try:
            reader = TensorDeserializer(file, device="cpu", lazy_load=True, verify_hash=self.options.verify_hash,
                                        encryption=self.decryption(file))
            with reader:
                for name, tensor in reader.items():
                    last = name
                    yield file, name, tensor
                    del tensor
        except LoadError:
            raise
        except Exception as e:  # tensorizer raises HashMismatchError, CryptographyError, ValueError, ...
            where = f"after tensor {last!r}" if last else "before the first tensor"
            hint = "wrong or missing passphrase (loader.passphrase_env)" if "crypt" in type(e).__name__.lower() \
                else "the file is truncated or corrupt"
            raise LoadError(f"{file}: tensorizer failed {where} ({type(e).__name__}: {e}); {hint}") from e


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("loader", TensorizerLoader.name, TensorizerLoader)
