"""Load time and peak host memory of every weight format, on a Qwen3-0.6B-shaped model with random weights.

    python benchmarks/load_formats.py                       # full Qwen3-0.6B shape, bfloat16 (~1.2 GB per file)
    python benchmarks/load_formats.py --layers 4 --vocab 32000 --formats safetensors,pt   # scaled down

Writes the model once as safetensors (random normal weights, std 0.02), converts it with `weavelm.convert` to each
format, then loads each in a fresh process: the loader's checked stream is copied into preallocated bfloat16
parameters (what a model's `load_weights` does), so the numbers are the loader's. Peak RSS is the process maximum
(VmHWM, reset just before loading); "extra" is that peak minus the RSS just before loading, and `x model` divides it by the model's bytes
(the parameters themselves count: 1.0 is the floor). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

FORMATS = ("safetensors", "pt", "tensorizer", "gguf_F16", "gguf_Q8_0")


def qwen3_config(args):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       head_dim=args.head_dim, tie_word_embeddings=True, max_position_embeddings=40960,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6}, dtype="bfloat16")


def build(args) -> dict[str, str]:
    import torch
    from safetensors.torch import save_file

    from weavelm.convert import convert
    from weavelm.plugins.loaders.common import expected_tensors

    cfg = qwen3_config(args)
    src = os.path.join(args.workdir, "safetensors")
    if not os.path.isfile(os.path.join(src, "model.safetensors")):
        os.makedirs(src, exist_ok=True)
        shapes, optional = expected_tensors(cfg)
        gen = torch.Generator().manual_seed(0)
        sd = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in shapes.items()
              if n not in optional}
        save_file(sd, os.path.join(src, "model.safetensors"))
        cfg.save_pretrained(src)
        del sd
    paths = {"safetensors": src}
    for fmt in args.formats:
        if fmt == "safetensors":
            continue
        out = os.path.join(args.workdir, fmt + (".gguf" if fmt.startswith("gguf") else ""))
        if not os.path.exists(out):
            t = time.perf_counter()
            to, _, gtype = fmt.partition("_")
            convert(src, out, to, gtype or "F16")
            print(f"  wrote {fmt} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        paths[fmt] = out
    return paths


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so the peak below is the load's, not the imports'."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def child(fmt: str, path: str) -> dict:
    """Runs in its own process: load `path` into preallocated bfloat16 parameters."""
    import torch

    from weavelm.core.registry import Registry
    from weavelm.plugins.loaders.common import expected_tensors

    cls = Registry.load().get("loader", fmt.partition("_")[0])
    loader = cls(cls.Options())
    cfg = loader.load_hf_config(path)
    shapes, optional = expected_tensors(cfg)
    sink = {n: torch.empty(s, dtype=torch.bfloat16) for n, s in shapes.items() if n not in optional}
    model_bytes = sum(t.numel() * t.element_size() for t in sink.values())
    reset_peak_rss()
    before = rss_bytes()
    t0 = time.perf_counter()
    with torch.no_grad():
        for name, tensor in loader.checked_weights(path, cfg):
            sink[name].copy_(tensor)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    return {"format": fmt, "load_s": round(seconds, 3), "peak_rss_gb": round(peak / 1e9, 3),
            "rss_before_gb": round(before / 1e9, 3), "extra_gb": round((peak - before) / 1e9, 3),
            "model_gb": round(model_bytes / 1e9, 3), "x_model": round((peak - before) / model_bytes, 3),
            "file_gb": round(sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(path) for f in fs)
                             / 1e9 if os.path.isdir(path) else os.path.getsize(path) / 1e9, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--formats", default=",".join(FORMATS), type=lambda s: s.split(","))
    p.add_argument("--workdir", default=os.path.expanduser("~/.cache/weavelm/bench-load-formats"))
    p.add_argument("--out", default="load_formats.json")
    p.add_argument("--child", nargs=2, metavar=("FORMAT", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    os.makedirs(args.workdir, exist_ok=True)
    paths = build(args)
    rows = []
    for fmt in args.formats:
        out = subprocess.run([sys.executable, __file__, "--child", fmt, paths[fmt]], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{fmt}: load failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    cols = ("format", "file_gb", "load_s", "peak_rss_gb", "rss_before_gb", "extra_gb", "x_model")
    print(" | ".join(f"{c:>13}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>13}" for c in cols))
    shape = {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab")}
    with open(args.out, "w") as f:
        json.dump({"shape": shape, "dtype": "bfloat16", "device": "cpu", "cpus": os.cpu_count(), "rows": rows}, f,
                  indent=2)


if __name__ == "__main__":
    main()
