"""The `flash_attn` attention backend: flash-attn's paged kernels, whichever build is importable.

Tried in order (first that loads wins):
  1. vLLM's FA3 build as `torch.ops._vllm_fa3_C.fwd`: loaded from the config's
     `kernels: {fa3_lib: /path/to/_vllm_fa3_C.abi3.so}` (default: `fa3/_vllm_fa3_C.abi3.so` under the cache root,
     when present), or already registered (vllm imported).
  2. FA3 from flash-attention's `hopper/` (`flash_attn_interface.flash_attn_with_kvcache(..., page_table=)`).
  3. FA2 (`flash_attn.flash_attn_varlen_func(..., block_table=)`, which needs block_size % 256 == 0).
The cache keeps the default layout `(2, num_blocks, block_size, kv_heads, head)`: `kv_cache[0]` / `kv_cache[1]` are
the per-K/V `(num_blocks, block_size, kv_heads, head)` tensors these APIs take. New K/V are written by the shared Triton
cache kernel (`weavelm.ops.cache_write`), which also zeroes CUDA-graph padding rows of the output.
A layer's sliding window w becomes flash-attn's `window_size=(w - 1, 0)` (keys p - w + 1 .. p, as transformers).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

import torch

from weavelm.core.forward import AttentionSpec, CommonAttentionMetadata
from weavelm.core.hookspecs import hookimpl
from weavelm.core.interfaces import AttentionBackend, AttentionImpl
from weavelm.ops import settings
from weavelm.ops.cache_write import reshape_and_cache, triton_unavailable_reasons
from weavelm.utils import cache_root

MAX_HEAD_SIZE = 256
FA3_DEFAULT = "fa3/_vllm_fa3_C.abi3.so"  # under the cache root


def load_flash_api() -> tuple[str | None, Any, str]:
    """(kind, entry point, why-not) with kind one of 'vllm_fa3', 'fa3', 'fa2', or None and the reasons; the FA3
    library named by the active `kernels.fa3_lib` is tried first."""
    lib = settings.active().fa3_lib
    if lib is None and (cache_root() / FA3_DEFAULT).is_file():
        lib = str(cache_root() / FA3_DEFAULT)
    return _load_flash_api(lib)


@functools.cache
def _load_flash_api(lib: str | None) -> tuple[str | None, Any, str]:
    tried = []
    if lib:
        try:
            torch.ops.load_library(lib)
        except Exception as e:  # a wrong path or an ABI mismatch: say so, try the packages next
            tried.append(f"kernels.fa3_lib={lib} did not load ({type(e).__name__}: {e})")
    try:
        return "vllm_fa3", torch.ops._vllm_fa3_C.fwd, ""
    except (AttributeError, RuntimeError):
        if not lib:
            tried.append("vLLM's FA3 op is not loaded (set kernels.fa3_lib=/path/to/_vllm_fa3_C.abi3.so)")
    for kind, module, fn in (("fa3", "flash_attn_interface", "flash_attn_with_kvcache"),
                             ("fa2", "flash_attn", "flash_attn_varlen_func")):
        try:
            return kind, getattr(importlib.import_module(module), fn), ""
        except Exception as e:  # ImportError, or an extension built for another torch
            tried.append(f"{module}: {type(e).__name__}: {e}")
    return None, None, "; ".join(tried)


def takes_window(kind: str, fn: Any) -> bool:
    """Whether the loaded entry point applies a sliding window: vLLM's op always takes `window_size_left/right`
    positionally; the Python APIs take `window_size=(left, right)` (FA2 since 2.3, FA3's hopper interface)."""
    if kind == "vllm_fa3":
        return True
    try:
        return "window_size" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: cannot tell, so no
        return False


class FlashAttnImpl(AttentionImpl):
    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__(num_heads, num_kv_heads, head_size, scale, sliding_window)
        self.kind, self.fn, why = load_flash_api()
        if self.kind is None:
            raise RuntimeError(f"flash_attn backend: no flash-attn build is usable: {why}")
        # flash-attn's (left, right) window: a query at p sees keys p - left .. p + right; (-1, -1) is unbounded
        self.window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
        self.window_kwargs = {} if sliding_window is None else {"window_size": self.window}

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: Any) -> torch.Tensor:
        m: CommonAttentionMetadata = metadata  # this backend's builder is the default: the common metadata
        n = q.shape[0]
        q3 = q.view(n, self.num_heads, self.head_size)
        out = torch.empty_like(q3)
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        reshape_and_cache(k.view(n, self.num_kv_heads, self.head_size), v.view(n, self.num_kv_heads, self.head_size),
                          k_cache, v_cache, m.slot_mapping, out, m.query_start_loc, m.num_reqs)
        if n > m.slot_mapping.shape[0]:
            out[m.slot_mapping.shape[0]:].zero_()
        if self.kind == "vllm_fa3":  # vLLM's op schema takes its 37 arguments by position, as vLLM's wrapper passes them
            self.fn(q3, k_cache, v_cache, None, None, None, out, m.query_start_loc, None, None, None, m.seq_lens,
                    m.max_query_len, m.max_seq_len, m.block_table, None, None, None, None, None, None, None, None,
                    self.scale, True, self.window[0], self.window[1], 0.0, True, None, 0, None, 0, None, 1, 0, None)
        else:
            if self.kind == "fa3":
                res = self.fn(q3, k_cache, v_cache, cache_seqlens=m.seq_lens, page_table=m.block_table,
                              cu_seqlens_q=m.query_start_loc, max_seqlen_q=m.max_query_len,
                              softmax_scale=self.scale, causal=True, **self.window_kwargs)
            else:
                cu_k = torch.nn.functional.pad(m.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
                res = self.fn(q3, k_cache, v_cache, cu_seqlens_q=m.query_start_loc, cu_seqlens_k=cu_k,
                              max_seqlen_q=m.max_query_len, max_seqlen_k=m.max_seq_len, softmax_scale=self.scale,
                              causal=True, block_table=m.block_table, **self.window_kwargs)
            res = res[0] if isinstance(res, tuple) else res
            real = torch.arange(n, device=q.device) < m.query_start_loc[m.num_reqs]
            torch.where(real[:, None, None], res, out, out=out)  # padded rows keep the zeros written above
        return out.view(n, self.num_heads * self.head_size)


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"
    description = "flash-attn paged kernels (vLLM's FA3 build, FA3 hopper interface or FA2), fp16/bf16 on CUDA."
    priority = 30
    graph_safe = True
    checks_kv_cache_dtype = True  # refuses fp8 caches with a reason (below)

    def __init__(self, options=None):
        super().__init__(options if options is not None else self.Options())

    @classmethod
    def check(cls, spec: AttentionSpec) -> list[str]:
        if spec.device != "cuda":
            return [f"device {spec.device!r}: flash-attn kernels need CUDA"]
        reasons = []
        if spec.dtype not in (torch.float16, torch.bfloat16):
            reasons.append(f"dtype {spec.dtype}: flash-attn takes float16 or bfloat16")
        if spec.kv_cache_dtype is not None and spec.kv_cache_dtype != spec.dtype:
            reasons.append(f"kv_cache_dtype {spec.kv_cache_dtype}: not supported here (FA3's fp8 path takes fp8 "
                           f"queries with q/k/v descale tensors, not yet wired or verified in weavelm); use "
                           f"attention: triton for an fp8 KV cache")
        if spec.head_size % 8 or spec.head_size > MAX_HEAD_SIZE:
            reasons.append(f"head_size {spec.head_size}: flash-attn needs a multiple of 8 up to {MAX_HEAD_SIZE}")
        if spec.num_heads % spec.num_kv_heads:
            reasons.append(f"num_heads ({spec.num_heads}) must be a multiple of num_kv_heads ({spec.num_kv_heads})")
        reasons += [f"cache write: {r}" for r in triton_unavailable_reasons(spec.device)]
        kind, fn, why = load_flash_api()
        if kind is not None and spec.sliding_window is not None and not takes_window(kind, fn):
            reasons.append(f"sliding_window {spec.sliding_window}: this flash-attn build ({kind}) takes no "
                           f"window_size (FA2 >= 2.3 or FA3 does)")
        if kind is None:
            reasons.append(f"no flash-attn build is usable: {why}")
        elif kind == "fa2" and spec.block_size % 256:
            reasons.append(f"block_size {spec.block_size}: FA2's paged KV needs a multiple of 256")
        elif kind in ("vllm_fa3", "fa3"):
            if spec.block_size % 16:
                reasons.append(f"block_size {spec.block_size}: FA3's paged KV needs a multiple of 16")
            if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] != 9:
                reasons.append(f"FA3 runs on Hopper (sm_90) only; this GPU is sm_"
                               f"{''.join(map(str, torch.cuda.get_device_capability()))}")
        return reasons

    def make_impl(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float,
                  sliding_window: int | None = None) -> AttentionImpl:
        return FlashAttnImpl(num_heads, num_kv_heads, head_size, scale, sliding_window)


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("attention", FlashAttnBackend.name, FlashAttnBackend)
