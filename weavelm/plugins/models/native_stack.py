"""The decoder stack in one native call per step, for small fp32 CPU batches (decode, speculative verification).

At batch 1 on the CPU, a token of the default model is ~300 small operations (9 per layer, plus module calls and
tensor bookkeeping around each); their Python and dispatch cost was a third of the step. When every layer is exactly
weavelm's Llama-family decoder layer whose linears' quantization methods offer native block packs
(`QuantizeMethodBase.native_pack`: a `BlockQ4Pack` or `BlockQ8Pack`), the attention
step is the native paged attention (an impl that says so with `native_paged_attention = True`, as the `cpu`
backend's does, and whose step metadata carries `common` when that kernel takes the step), and there is no tensor
parallelism or LoRA wrapper, the model's forward hands the whole stack to `wl_decoder_forward`
(`weavelm/ops/native/stack.c`): the same kernels the per-layer path calls, in the same order, so the result is
identical (tested bit for bit). Anything else takes the per-layer path, unchanged. The config's
`kernels: {native_stack: false}` turns this off (for A/B measurements).
"""

from __future__ import annotations

import ctypes

import torch

from weavelm.core.quantization import native_pack
from weavelm.ops import native
from weavelm.ops import settings as kernel_settings
from weavelm.ops.quant_kernels import BlockQ4Pack

P, I64, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
MAX_TOKENS = 64  # the blocked kernels' sweet spot; wider steps (prefill) run per layer with dense GEMMs


class WLinear(ctypes.Structure):
    _fields_ = [("kind", I64), ("codes", P), ("d", P), ("m", P), ("bias", P), ("n", I64), ("k", I64)]


class WLayer(ctypes.Structure):
    _fields_ = [("input_norm", P), ("post_norm", P), ("q_norm", P), ("k_norm", P), ("qkv", WLinear),
                ("o", WLinear), ("gate_up", WLinear), ("down", WLinear), ("kv_cache", P)]


class WStep(ctypes.Structure):
    _fields_ = [(name, I64) for name in ("T", "R", "H", "KVH", "D", "hidden", "inter", "max_blocks", "block_size",
                                         "num_slots", "n_slots")] + \
               [("eps", F32), ("scale", F32)] + \
               [(name, P) for name in ("positions", "slot_mapping", "query_start_loc", "seq_lens", "block_table",
                                       "cos_cache", "sin_cache", "x_norm", "qkv", "attn", "gate_up", "act")]


def _enabled() -> bool:
    return kernel_settings.active().native_stack


def _linear(module) -> WLinear | None:
    pack = native_pack(module)
    if pack is None:
        return None
    bias = getattr(module, "bias", None)
    if bias is not None and not (bias.dtype == torch.float32 and bias.is_contiguous()):
        return None
    if isinstance(pack, BlockQ4Pack):
        return WLinear(0, pack.codes.data_ptr(), pack.d.data_ptr(), pack.m.data_ptr(),
                       None if bias is None else bias.data_ptr(), pack.n, pack.k)
    return WLinear(1, pack.codes.data_ptr(), pack.d.data_ptr(), None, None if bias is None else bias.data_ptr(),
                   pack.n, pack.k)


class NativeStack:
    """Built once per model (`build`), run per step (`run`); `run` returns None where the step does not qualify."""

    def __init__(self, model, layers: ctypes.Array, keep: list):
        self.model, self.layers, self.keep = model, layers, keep  # keep: what the descriptors point into
        attn = model.layers[0].self_attn
        self.h, self.kvh, self.d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.hidden, self.inter = model.dims.hidden, model.layers[0].mlp.gate_up_proj.out_per_rank // 2
        self.eps = float(model.layers[0].input_layernorm.eps)
        self.kv_ptr = None

    @classmethod
    def build(cls, model) -> NativeStack | None:
        from weavelm.plugins.models.decoder import DecoderLayer
        from weavelm.layers import (MergedColumnParallelLinear, QKVParallelLinear, RMSNorm, RowParallelLinear,
                                    SiluAndMul)

        attn = model.layers[0].self_attn
        if not (_enabled() and native.available()) or model.tp.world_size != 1 or \
                not native.attention_supported(attn.num_heads, attn.num_kv_heads, attn.head_dim):
            return None
        rot = model.rotary
        if not (rot.cos_cache.dtype == torch.float32 and rot.cos_cache.is_cpu and rot.cos_cache.is_contiguous()):
            return None
        descs, keep = [], []
        for layer in model.layers:
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            if type(layer) is not DecoderLayer or type(attn.qkv_proj) is not QKVParallelLinear or \
                    type(attn.o_proj) is not RowParallelLinear or \
                    type(mlp.gate_up_proj) is not MergedColumnParallelLinear or \
                    type(mlp.down_proj) is not RowParallelLinear or type(mlp.act) is not SiluAndMul:
                return None  # a LoRA wrapper, or another architecture's layer
            norms = [layer.input_layernorm, layer.post_attention_layernorm, attn.q_norm, attn.k_norm]
            if any(n is not None and (type(n) is not RMSNorm or n.weight.dtype != torch.float32 or
                                      n.eps != layer.input_layernorm.eps) for n in norms):
                return None
            linears = [_linear(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            if any(lin is None for lin in linears):
                return None
            ptrs = [None if n is None else n.weight.data_ptr() for n in norms]
            descs.append(WLayer(*ptrs, *linears, None))
            keep.append(layer)
        return cls(model, (WLayer * len(descs))(*descs), keep)

    def run(self, positions: torch.Tensor, x: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        meta = batch.attn_metadata
        common = getattr(meta, "common", None)
        t = x.shape[0]
        native_attention = all(getattr(i, "native_paged_attention", False) for i in batch.attn_impls)
        if common is None or t > MAX_TOKENS or not native_attention or \
                x.dtype != torch.float32 or not x.is_contiguous() or positions.dtype != torch.int64 or \
                positions.shape[0] != t or common.num_actual_tokens != t or \
                common.slot_mapping.dtype != torch.int64 or not common.block_table.is_contiguous():
            return None
        caches = batch.kv_caches
        if self.kv_ptr != caches[0].data_ptr():  # the cache was (re)allocated: point every layer at it
            for desc, cache in zip(self.layers, caches):
                if cache.dtype != torch.float32 or not cache.is_contiguous():
                    return None
                desc.kv_cache = cache.data_ptr()
            self.kv_ptr = caches[0].data_ptr()
        cache = caches[0]
        h, kvh, d, hid, inter = self.h, self.kvh, self.d, self.hidden, self.inter
        width = (h + 2 * kvh) * d
        scratch = torch.empty(t * (hid + width + h * d + 3 * inter), dtype=torch.float32)
        base = scratch.data_ptr()
        offsets = [0, hid, width, h * d, 2 * inter]
        ptrs, acc = [], 0
        for o in offsets:
            acc += o * t
            ptrs.append(base + 4 * acc)
        rot = self.model.rotary
        impl = batch.attn_impls[0]
        step = WStep(t, common.num_reqs, h, kvh, d, hid, inter, common.block_table.shape[1], cache.shape[2],
                     cache.shape[1] * cache.shape[2], common.slot_mapping.shape[0], self.eps, impl.scale,
                     positions.data_ptr(), common.slot_mapping.data_ptr(), common.query_start_loc.data_ptr(),
                     common.seq_lens.data_ptr(), common.block_table.data_ptr(), rot.cos_cache.data_ptr(),
                     rot.sin_cache.data_ptr(), *ptrs)
        residual = torch.empty_like(x)
        native.lib().wl_decoder_forward(self.layers, len(self.layers), ctypes.byref(step), x.data_ptr(),
                                        residual.data_ptr())
        return x, residual
