"""The `kernels:` config section: which kernel families this engine may use, and where to find optional ones.

These switches govern process-wide things (a compiled library loaded once per process, kernels chosen when layers
are built), so the assembler activates the engine's section in each process that builds a model runner, before the
runner exists (`activate`, called by `RunnerBuilder`); the ops and layers read the active section (`active()`).
A process that builds one engine after another runs with the latest engine's section.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class KernelConfig(BaseModel):
    """Kernel switches (the former WEAVELM_NATIVE_KERNELS, WEAVELM_NATIVE_STACK, WEAVELM_DISABLE_TRITON_OPS and
    WEAVELM_FA3_LIB environment variables), same defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    native: bool = Field(True, description="Use weavelm's native CPU kernels (`weavelm.ops.native`, compiled on "
                         "first use) for fp32 CPU tensors; false: torch's ops everywhere.")
    native_stack: bool = Field(True, description="Run a whole fp32 CPU decoder step in one native call where the "
                               "model qualifies (needs `native`).")
    triton_ops: bool = Field(True, description="Layers use the Triton kernels on CUDA tensors when triton is "
                             "installed; false: torch's ops.")
    fa3_lib: str | None = Field(None, description="Path of vLLM's FA3 library (`_vllm_fa3_C.abi3.so`) for the "
                                "`flash_attn` attention backend to load first; None: `fa3/_vllm_fa3_C.abi3.so` under "
                                "the cache root (`weavelm.utils.cache_root()`) when that file exists.")


_active = KernelConfig()


def activate(config: KernelConfig) -> None:
    """Make `config` the section this process's kernels follow. Called by the assembler before it builds a runner."""
    global _active
    _active = config


def active() -> KernelConfig:
    """The section this process's kernels follow (defaults until an engine activates its own)."""
    return _active
