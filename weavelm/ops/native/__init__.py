"""weavelm's native CPU kernels (the C sources of this folder: `gemm.c`, `layers.c`, `attention.c`, `stack.c`,
sharing `common.h`): built once per machine with the system C compiler into one library, loaded with ctypes,
called on fp32 CPU tensors.

The library is compiled on first use (`cc -O3 -march=native -fopenmp`, about 2 s) into
`weavelm.utils.cache_root() / "native"` (default `~/.cache/weavelm/native`), under a name that hashes the source, the compiler's
version and this CPU's feature flags, so a cache shared between machines never runs code built for another CPU.
It links `libgomp.so.1`, the OpenMP runtime torch itself loads (same soname), so its parallel loops run on torch's
threads and follow `torch.set_num_threads`.

`available()` says whether the kernels can run here; `unavailable_reason()` says why not (no compiler, a build
error, the config's `kernels: {native: false}`). Every caller keeps a torch path for that case, so the kernels are a speed-up,
never a requirement.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from weavelm.ops import settings
from weavelm.utils import cache_root

log = logging.getLogger("weavelm.native")

SOURCES = tuple(Path(__file__).with_name(name) for name in ("gemm.c", "layers.c", "attention.c", "stack.c"))
HEADER = Path(__file__).with_name("common.h")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_loaded = False

P, I64, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
SIGNATURES = {
    "wl_q4_gemm": ([P, I64, I64, I64, P, P, P, I64, P, P, I64], None),
    "wl_q8_gemm": ([P, I64, I64, I64, P, P, I64, P, P, I64], None),
    "wl_dequant_q4": ([P, P, P, I64, I64, P], None),
    "wl_dequant_q8": ([P, P, I64, I64, P], None),
    "wl_rmsnorm": ([P, P, P, P, F32, I64, I64, P], None),
    "wl_silu_mul": ([P, I64, I64, P], None),
    "wl_rotary": ([P, I64, I64, I64, I64, I64, I64, I64, P, P, P], None),
    "wl_paged_attention": ([P, I64, P, I64, P, I64, P, I64, P, I64, P, P, P, I64, I64, I64, I64, I64, I64, F32, P,
                            I64, I64], None),
    "wl_decoder_forward": ([P, I64, P, P, P], None),
    "wl_head_norm": ([P, I64, I64, I64, I64, I64, P, F32], None),
}


def cache_dir() -> Path:
    return cache_root() / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    texts = [p.read_text() for p in (HEADER, *SOURCES)]
    key = hashlib.sha256("\0".join([*texts, version, " ".join(FLAGS), platform.machine(),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"cpu_kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, "-o", tmp, *map(str, SOURCES), "-lm"], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)  # atomic: concurrent builders each write their own file, one wins
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load() -> None:
    global _lib, _reason, _loaded
    with _lock:
        if _loaded:
            return
        try:
            cc = _compiler()
            if cc is None:
                raise RuntimeError("no C compiler found (install gcc, or set CC)")
            lib = ctypes.CDLL(str(_build(cc)))
            for name, (args, res) in SIGNATURES.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = args, res
            _lib = lib
        except Exception as e:  # noqa: BLE001 - any failure means: use the torch path, and say why
            _reason = f"native CPU kernels unavailable: {e}"
            log.info(_reason)
        _loaded = True


def lib() -> ctypes.CDLL | None:
    """The loaded library, or None when it cannot run here, is switched off by the active `kernels:` section, or
    inside `disabled()`. Built and loaded on the first call that wants it."""
    if _off or not settings.active().native:
        return None
    if not _loaded:
        _load()
    return _lib


_off = False


@contextmanager
def disabled():
    """Within this block every caller takes its torch path (for tests and A/B measurements). Decisions made at
    load time (the GGUF packing) follow the state at load."""
    global _off
    prev, _off = _off, True
    try:
        yield
    finally:
        _off = prev


def available() -> bool:
    return lib() is not None


def unavailable_reason() -> str | None:
    if _off:
        return "native CPU kernels disabled (native.disabled())"
    if not settings.active().native:
        return "native CPU kernels switched off by the config (kernels: {native: false})"
    lib()
    return _reason


def attention_supported(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """The shapes `wl_paged_attention` takes: head sizes a multiple of 16 up to 256, up to 8 query heads per kv
    head (its per-item register arrays). Callers run other shapes through SDPA."""
    return head_dim % 16 == 0 and head_dim <= 256 and num_heads % num_kv_heads == 0 and \
        num_heads // num_kv_heads <= 8


def usable(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can go through the kernels: the library loaded, and all fp32 on the CPU. Autograd
    is not supported, so tensors that require grad go the torch way."""
    if lib() is None:
        return False
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad for t in tensors)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# ---- wrappers (inputs already checked by the caller: fp32, CPU, contiguous rows) -------------------------------

def q4_gemm(x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, n: int,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) fp32 with unit column stride -> (M, n) fp32; codes (n, K / 2) uint8, d and m (n, K / 32) fp32."""
    rows, k = x.shape
    y = torch.empty(rows, n, dtype=torch.float32)
    _lib.wl_q4_gemm(x.data_ptr(), rows, x.stride(0), k, codes.data_ptr(), d.data_ptr(), m.data_ptr(), n,
                    _ptr(bias), y.data_ptr(), n)
    return y


def q8_gemm(x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, n: int,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    rows, k = x.shape
    y = torch.empty(rows, n, dtype=torch.float32)
    _lib.wl_q8_gemm(x.data_ptr(), rows, x.stride(0), k, codes.data_ptr(), d.data_ptr(), n, _ptr(bias),
                    y.data_ptr(), n)
    return y


def dequant_q4(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, n: int, k: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    w = torch.empty(n, k, dtype=torch.float32) if out is None else out
    _lib.wl_dequant_q4(codes.data_ptr(), d.data_ptr(), m.data_ptr(), n, k, w.data_ptr())
    return w


def dequant_q8(codes: torch.Tensor, d: torch.Tensor, n: int, k: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    w = torch.empty(n, k, dtype=torch.float32) if out is None else out
    _lib.wl_dequant_q8(codes.data_ptr(), d.data_ptr(), n, k, w.data_ptr())
    return w


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x (..., H) contiguous. Without residual: norm(x). With: (norm(x + residual), x + residual)."""
    h = x.shape[-1]
    rows = x.numel() // h
    out = torch.empty_like(x)
    if residual is None:
        _lib.wl_rmsnorm(x.data_ptr(), None, None, weight.data_ptr(), eps, rows, h, out.data_ptr())
        return out
    summed = torch.empty_like(x)
    _lib.wl_rmsnorm(x.data_ptr(), residual.data_ptr(), summed.data_ptr(), weight.data_ptr(), eps, rows, h,
                    out.data_ptr())
    return out, summed


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    rows = x.numel() // x.shape[-1]
    out = torch.empty(*x.shape[:-1], d, dtype=x.dtype)
    _lib.wl_silu_mul(x.data_ptr(), rows, d, out.data_ptr())
    return out


def head_norm_(qkv: torch.Tensor, off: int, heads: int, head_dim: int, weight: torch.Tensor, eps: float) -> None:
    """RMSNorm in place over each of `heads` head_dim-wide heads from column `off` of the (T, stride) rows."""
    _lib.wl_head_norm(qkv.data_ptr(), qkv.shape[0], qkv.stride(0), off, heads, head_dim, weight.data_ptr(), eps)


def rotary_(qkv: torch.Tensor, q_off: int, num_q_heads: int, k_off: int, num_k_heads: int, head_dim: int,
            positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place on the (T, stride) rows of `qkv` (unit column stride); positions int64 contiguous."""
    _lib.wl_rotary(qkv.data_ptr(), qkv.shape[0], qkv.stride(0), q_off, num_q_heads, k_off, num_k_heads, head_dim,
                   positions.data_ptr(), cos.data_ptr(), sin.data_ptr())


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                    block_table: torch.Tensor, num_reqs: int, num_heads: int, num_kv_heads: int, head_dim: int,
                    scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Write the new keys/values into `kv_cache` (2, blocks, block_size, kv_heads, head_dim) at `slot_mapping`,
    then causal attention for every token (over its last `sliding_window` positions only, when given). q (T, >= H * D),
    k and v (T, >= KVH * D) rows with unit column stride; query_start_loc / seq_lens / block_table int32 and
    slot_mapping int64, contiguous, on the CPU. Returns (T, H * D); rows past the real tokens are zero."""
    t = q.shape[0]
    out = torch.empty(t, num_heads * head_dim, dtype=torch.float32)
    num_slots = kv_cache.shape[1] * kv_cache.shape[2]
    _lib.wl_paged_attention(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                            kv_cache.data_ptr(), num_slots, slot_mapping.data_ptr(), slot_mapping.shape[0],
                            query_start_loc.data_ptr(), seq_lens.data_ptr(), block_table.data_ptr(),
                            block_table.shape[1], kv_cache.shape[2], num_reqs, num_heads, num_kv_heads, head_dim,
                            scale, out.data_ptr(), t, sliding_window or 0)
    return out
