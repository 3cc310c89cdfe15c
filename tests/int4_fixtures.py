"""Int4 checkpoints of one tiny random Llama, written in each format's documented layout (tests/test_quant_int4.py).

Every linear weight W (N, K) is quantized to 4 bits per group of 32 input features; the checkpoint stores the packed
codes, and `dequantized` holds the exact float weights they stand for, which the transformers reference runs.
- GPTQ (AutoGPTQ / GPTQModel v1, `checkpoint_format: gptq`): qweight (K/8, N) packed along K, qzeros (G, N/8) packed
  along N holding zero - 1 (GPTQModel subtracts 0x11111111 from each int32 word), scales (G, N) fp16, g_idx (K,);
  `desc_act` assigns groups by a random permutation of K (act-order), so a group's features are scattered.
- AWQ (AutoAWQ GEMM): qweight (K, N/8) and qzeros (G, N/8) packed along N in the order [0, 2, 4, 6, 1, 3, 5, 7],
  scales (G, N) fp16, no zero offset.
- compressed-tensors pack-quantized W4A16: written by the compressed-tensors library itself
  (`PackedQuantizationCompressor.compress` of the weight with our scales and zero points, its `QuantizationConfig`
  for config.json); with `desc_act`, the `actorder: group` layout of earlier releases (`weight_g_idx`), packed by
  the library's `pack_to_int32`.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

HIDDEN, INTER, GROUP = 128, 256, 32
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def float_model():
    """The random float Llama (transformers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.3, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1,
                      eos_token_id=2)
    return LlamaForCausalLM(cfg).float().eval()


def quantize(w: torch.Tensor, g_idx: torch.Tensor, groups: int, sym: bool):
    """codes (N, K) in 0..15, scales (G, N) fp16, zeros (G, N) ints, with input feature k in group g_idx[k];
    w ~ (codes - zeros[g_idx]) * scales[g_idx]."""
    n, k = w.shape
    cols = w[:, torch.sort(g_idx, stable=True).indices].reshape(n, groups, k // groups)
    lo, hi = cols.amin(-1).clamp(max=0).t(), cols.amax(-1).clamp(min=0).t()
    if sym:
        scales = (torch.maximum(hi, -lo) * 2 / 15).half().float()
        zeros = torch.full_like(scales, 8.0)
    else:
        scales = ((hi - lo) / 15).half().float()
        zeros = torch.round(-lo / scales).clamp(0, 15)
    s, z = scales[g_idx].t(), zeros[g_idx].t()
    codes = torch.clamp(torch.round(w / s) + z, 0, 15).to(torch.int64)
    return codes, scales.half(), zeros.to(torch.int64)


def dequantized(codes, scales, zeros, g_idx) -> torch.Tensor:
    return (codes.float() - zeros[g_idx].t().float()) * scales[g_idx].t().float()


def to_int32(words: torch.Tensor) -> torch.Tensor:
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def pack_along(values: torch.Tensor, dim: int, order=tuple(range(8))) -> torch.Tensor:
    """Pack eight 4-bit values along `dim` into one int32: nibble i holds element 8 c + order[i]."""
    v = values.movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], -1, 8)[..., list(order)].to(torch.int64)
    words = (v << (4 * torch.arange(8))).sum(-1)
    return to_int32(words).movedim(-1, dim).contiguous()


def _write(path: str, tensors: dict, hf_config: dict, quant: dict) -> str:
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**hf_config, "quantization_config": quant}, f)
    return path


def write_checkpoint(fmt: str, model, path: str, *, desc_act: bool = False, sym: bool = False, seed: int = 1):
    """Write `model` as a `fmt` ("gptq", "awq", "ct") int4 checkpoint at `path`; returns the dequantized state dict
    (what the checkpoint means, for the transformers reference)."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dense = dict(state)
    orders: dict[str, torch.Tensor] = {}
    tensors = {k: v for k, v in state.items() if not any(f"{lin}.weight" in k for lin in LINEARS)}
    for name, w in state.items():
        if not any(f"{lin}.weight" in name for lin in LINEARS):
            continue
        base = name[: -len(".weight")]
        n, k = w.shape
        groups = k // GROUP
        g_idx = torch.arange(k) // GROUP
        if desc_act:  # one act-order per input: layers reading the same activations share their Hessian's order
            shared = base.rsplit(".", 1)[0] + {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu",
                                               "up_proj": "gu"}.get(base.rsplit(".", 1)[1], base)
            if shared not in orders:
                orders[shared] = torch.randperm(k, generator=gen)
            g_idx = g_idx[orders[shared]]
        codes, scales, zeros = quantize(w, g_idx, groups, sym)
        dense[name] = dequantized(codes, scales, zeros, g_idx)
        if fmt == "gptq":
            tensors[base + ".qweight"] = pack_along(codes.t(), 0)
            tensors[base + ".qzeros"] = to_int32(pack_along(zeros, 1).to(torch.int64) - 0x11111111)
            tensors[base + ".scales"] = scales
            tensors[base + ".g_idx"] = g_idx.to(torch.int32)
        elif fmt == "awq":
            tensors[base + ".qweight"] = pack_along(codes.t(), 1, AWQ_ORDER)
            tensors[base + ".qzeros"] = pack_along(zeros, 1, AWQ_ORDER)
            tensors[base + ".scales"] = scales
        else:
            packed = _ct_pack_actorder(codes, scales, zeros, g_idx, sym) if desc_act else \
                _ct_compress(w, scales, zeros, sym)
            tensors.update({f"{base}.{k}": v for k, v in packed.items()})
            dense[name] = _ct_meaning(packed, scales, zeros, g_idx)
    hf = model.config.to_dict()
    hf.pop("quantization_config", None)
    hf["architectures"] = ["LlamaForCausalLM"]
    if fmt == "gptq":
        quant = {"bits": 4, "group_size": GROUP, "desc_act": desc_act, "sym": sym, "damp_percent": 0.01,
                 "static_groups": False, "true_sequential": True, "lm_head": False, "quant_method": "gptq",
                 "checkpoint_format": "gptq", "meta": {"quantizer": ["gptqmodel:2.2.0"]}}
    elif fmt == "awq":
        quant = {"quant_method": "awq", "zero_point": True, "group_size": GROUP, "bits": 4, "version": "gemm",
                 "modules_to_not_convert": None}
    else:
        quant = ct_config(sym)
        if desc_act:  # what earlier llm-compressor releases wrote for GPTQ with activation order (weight_g_idx)
            quant["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    _write(path, tensors, hf, quant)
    return dense


def _scheme(sym: bool):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=sym, strategy="group", group_size=GROUP))


def _ct_compress(w, scales, zeros, sym):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    state = {"weight": w, "weight_scale": scales.t().contiguous(),
             "weight_zero_point": (zeros.t() - 8).to(torch.int8).contiguous()}
    if sym:
        state.pop("weight_zero_point")
    return PackedQuantizationCompressor.compress(state, _scheme(sym))


def _ct_pack_actorder(codes, scales, zeros, g_idx, sym):
    """compressed-tensors' layout with `actorder: group` (scattered groups, `weight_g_idx`), packed by the library's
    own `pack_to_int32` (its compressor no longer writes this scheme)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    n, k = codes.shape
    out = {"weight_packed": pack_to_int32((codes - 8).to(torch.int8), 4), "weight_scale": scales.t().contiguous(),
           "weight_shape": torch.tensor([n, k]), "weight_g_idx": g_idx.to(torch.int32)}
    if not sym:
        out["weight_zero_point"] = pack_to_int32((zeros.t() - 8).to(torch.int8).contiguous(), 4, packed_dim=0)
    return out


def _ct_meaning(packed, scales, zeros, g_idx):
    """What the library wrote, decoded with its own unpacking: (q - zero) * scale in fp32."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    q = unpack_from_int32(packed["weight_packed"], 4, tuple(packed["weight_shape"].tolist())).to(torch.int64) + 8
    return dequantized(q, scales, zeros, g_idx)


def ct_config(sym: bool) -> dict:
    from compressed_tensors.quantization import QuantizationConfig

    cfg = QuantizationConfig(config_groups={"group_0": _scheme(sym)}, format="pack-quantized",
                             quantization_status="compressed", ignore=["lm_head"])
    return cfg.model_dump(mode="json")
