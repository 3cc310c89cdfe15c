"""Which implementation a layer op runs: the Triton kernels (`triton_ops.py`, CUDA tensors), weavelm's native CPU
kernels (`weavelm.ops.native`, fp32 CPU tensors, when they built), or the torch code in the layer (the fallback and
the reference both are tested against).

`WEAVELM_DISABLE_TRITON_OPS=1`, read when a layer is built, keeps a layer on the torch path everywhere.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_ops_enabled() -> bool:
    """Whether new layers may use the Triton kernels: triton is installed and WEAVELM_DISABLE_TRITON_OPS is unset
    (or "0"). Layers call this once, in their constructor."""
    if os.environ.get("WEAVELM_DISABLE_TRITON_OPS", "0") not in ("", "0"):
        return False
    return importlib.util.find_spec("triton") is not None


def triton_device(x: torch.Tensor) -> bool:
    """The per-call check: the Triton kernels run on CUDA tensors only."""
    return x.is_cuda


def ops():
    """The Triton kernels' module, imported at the first CUDA call (listing plugins never imports triton)."""
    from weavelm.layers import triton_ops
    return triton_ops
