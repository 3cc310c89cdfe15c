"""Weight memory of fp8 against bf16, measured: a random Qwen3-shaped checkpoint (default ~270 M parameters) written
as bf16 safetensors and as a block-fp8 checkpoint, each loaded in its own process with dtype bfloat16.

Per variant: the methods that run, the resident weight bytes the engine reports (`model_info()["weight_bytes"]`:
parameters, buffers and packs), and what the load costs: on the CPU the resident memory the process gains by
creating the engine (VmRSS after minus before: the weights, a small KV cache and the engine's own objects), on CUDA
`torch.cuda.max_memory_allocated` (the load's peak).

  python benchmarks/quant_memory.py --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

FP8_BLOCK = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
VARIANTS = {"bf16": ("dense", "none"), "fp8 on the fly": ("dense", "fp8"), "fp8 block checkpoint": ("block", "auto")}


def write_checkpoints(root: str, args) -> dict[str, str]:
    from safetensors.torch import save_file
    from transformers import Qwen3Config

    from weavelm.ops.fp8_kernels import quantize

    cfg = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads // 2, head_dim=args.hidden // args.heads,
                      tie_word_embeddings=False)
    cfg.architectures = ["Qwen3ForCausalLM"]
    gen = torch.Generator().manual_seed(0)
    h, i, q, kv = args.hidden, args.intermediate, args.hidden, args.hidden // 2
    shapes = {"model.embed_tokens.weight": (args.vocab, h), "lm_head.weight": (args.vocab, h),
              "model.norm.weight": (h,)}
    for n in range(args.layers):
        p = f"model.layers.{n}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_norm.weight": (h // args.heads,),
                   p + "self_attn.k_norm.weight": (h // args.heads,),
                   p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i)}
    dense, block = {}, {}
    for name, shape in shapes.items():
        t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        dense[name] = block[name] = t
        if name.endswith("_proj.weight"):
            block[name], block[name.removesuffix("weight") + "weight_scale_inv"] = quantize(t.float(), (128, 128))
    paths = {}
    for kind, tensors in (("dense", dense), ("block", block)):
        path = os.path.join(root, kind)
        cfg.save_pretrained(path)
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        if kind == "block":
            with open(os.path.join(path, "config.json")) as f:
                raw = json.load(f)
            raw["quantization_config"] = FP8_BLOCK
            with open(os.path.join(path, "config.json"), "w") as f:
                json.dump(raw, f)
        paths[kind] = path
    return paths


def measure_one(path: str, quantization: str, device: str) -> dict:
    """Run in a fresh process: load, report, exit."""
    from weavelm import LLM
    from weavelm.core.registry import Registry

    registry = Registry.load()
    registry.register_module("weavelm.plugins.quantization.fp8")  # a no-op once installed with its entry point
    before = _rss()
    llm = LLM(model=path, dtype="bfloat16", device=device, quantization=quantization, cache={"num_blocks": 8},
              registry=registry)
    info = llm.collective_rpc("model_info")[0]
    grown = torch.cuda.max_memory_allocated() if device == "cuda" else _rss() - before
    llm.shutdown()
    return {"methods": info.get("quantization") or "dense", "weight_bytes": info["weight_bytes"], "grown_bytes": grown}


def _rss() -> int:
    """The process's resident memory now (VmRSS), in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3072)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure_one(*args.child, args.device)))
        return
    with tempfile.TemporaryDirectory(prefix="weavelm_qmem_") as root:
        paths = write_checkpoints(root, args)
        rows = []
        for name, (kind, quantization) in VARIANTS.items():
            out = subprocess.run([sys.executable, __file__, "--device", args.device, "--child", paths[kind],
                                  quantization], capture_output=True, text=True, check=True)
            rows.append({"variant": name, **json.loads(out.stdout.strip().splitlines()[-1])})
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"weight memory, Qwen3 shape hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}, {card}")
    grown = "peak CUDA allocated MiB" if args.device == "cuda" else "RSS gained by the engine MiB"
    print(f"| variant | methods | resident weights MiB | {grown} |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['methods']} | {r['weight_bytes'] / 2**20:.1f} | {r['grown_bytes'] / 2**20:.1f} |")


if __name__ == "__main__":
    main()
