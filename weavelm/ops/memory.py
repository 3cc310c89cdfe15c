"""Allocation helpers for large buffers."""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from weavelm.errors import ConfigError

GIB = 1024 ** 3


def available_bytes(device: torch.device | str) -> int | None:
    """Memory that can be allocated on `device` now: free GPU memory (torch.cuda.mem_get_info) or the host's
    available RAM (psutil, else os.sysconf); None when it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def check_fits(nbytes: int, device: torch.device | str, field: str, what: str, fix: str) -> None:
    """Raise ConfigError (at `field`) when allocating `nbytes` for `what` cannot fit `device`'s available memory,
    instead of a raw MemoryError / CUDA out-of-memory from deep inside the allocation."""
    available = available_bytes(device)
    if available is not None and nbytes > available:
        raise ConfigError([(field, f"{what} needs {nbytes / GIB:.2f} GiB but {torch.device(device).type} memory "
                                   f"has {available / GIB:.2f} GiB available; {fix}")])


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor. On the CPU its pages come zeroed from the OS on first touch (numpy's calloc), so a 1 GiB KV
    cache costs nothing until used, where `torch.zeros` writes every byte at startup (~1.5 s on 2 cores)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)
