"""Which implementation a layer op runs: the Triton kernels (`triton_ops.py`, CUDA tensors), weavelm's native CPU
kernels (`weavelm.ops.native`, fp32 CPU tensors, when they built), or the torch code in the layer (the fallback and
the reference both are tested against).

The config's `kernels: {triton_ops: false}`, read when a layer is built, keeps a layer on the torch path everywhere.
"""

from __future__ import annotations

import importlib.util

import torch

from weavelm.ops import settings as kernel_settings


def triton_ops_enabled() -> bool:
    """Whether new layers may use the Triton kernels: triton is installed and the engine's `kernels.triton_ops` is
    on. Layers call this once, in their constructor."""
    if not kernel_settings.active().triton_ops:
        return False
    return importlib.util.find_spec("triton") is not None


def triton_device(x: torch.Tensor) -> bool:
    """The per-call check: the Triton kernels run on CUDA tensors only."""
    return x.is_cuda


def ops():
    """The Triton kernels' module, imported at the first CUDA call (listing plugins never imports triton)."""
    from weavelm.layers import triton_ops
    return triton_ops
