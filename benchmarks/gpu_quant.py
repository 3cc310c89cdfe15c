"""Decode speed and weight memory of quantized weights on CUDA: batch-1 and batch-64 decode tok/s of a model shape
with random weights (default: Llama-3.1-8B) for each weight format.

Variants (`--variants`): `bf16` (dense), `fp8-block` (a block-fp8 checkpoint's layout: config.json carries
`quantization_config: {quant_method: fp8, weight_block_size: [128, 128]}`; W8A8 through the Triton block GEMM),
`fp8-channel` (`quantization: fp8`, per-channel W8A8 through torch._scaled_mm). Weights come from the `dummy` loader
(fp8 codes drawn from the same normal, scales 1), so only speed and memory are measured here; correctness is
tests/test_quant_fp8.py's. Batch-1 tok/s counts the tokens after the first over the time after the first token;
batch-64 tok/s is 64 x (output_len - 1) over (time to generate output_len tokens - time to generate 1).

  python benchmarks/gpu_quant.py --shape llama-8b --out gpu_quant.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from gpu_decode import SHAPES, write_config  # noqa: E402

FP8_BLOCK = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
# variant -> (config.json quantization_config or None, engine `quantization`)
VARIANTS = {"bf16": (None, "none"), "fp8-block": (FP8_BLOCK, "auto"), "fp8-channel": (None, "fp8")}


def model_dir(shape: str, quant_config: dict | None, root: str) -> str:
    path = write_config(shape, os.path.join(root, f"{shape}-{'q' if quant_config else 'dense'}"))
    if quant_config is not None:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        cfg["quantization_config"] = quant_config
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg, f)
    return path


def run_variant(name: str, path: str, args) -> dict:
    from weavelm import LLM, SamplingParams

    quantization = VARIANTS[name][1]
    torch.cuda.reset_peak_memory_stats()
    llm = LLM(model=path, dtype="bfloat16", device="cuda", loader="dummy", quantization=quantization,
              max_model_len=args.prompt_len + args.output_len + 16,
              cache={"num_blocks": args.batch * ((args.prompt_len + args.output_len) // 16 + 2)},
              scheduler={"max_num_seqs": args.batch, "max_num_batched_tokens": max(2048, args.prompt_len)},
              model_runner={"cuda_graph_max_bs": args.batch})
    info = llm.collective_rpc("model_info")[0]
    prompt = {"prompt_token_ids": list(range(1, args.prompt_len + 1))}
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # warm up
    best1 = 0.0
    for _ in range(args.repeats):
        stamps = [time.perf_counter() for _ in llm.stream(prompt, params)]
        best1 = max(best1, (len(stamps) - 1) / (stamps[-1] - stamps[0]))
    batch = [{"prompt_token_ids": [1 + (i + j) % 1000 for j in range(args.prompt_len)]} for i in range(args.batch)]
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate(batch, params)  # warm up the batch shapes
    best64 = 0.0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        llm.generate(batch, one)
        t1 = time.perf_counter()
        llm.generate(batch, params)
        t2 = time.perf_counter()
        best64 = max(best64, args.batch * (args.output_len - 1) / ((t2 - t1) - (t1 - t0)))
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return {"variant": name, "quantization": info.get("quantization"), "weight_gib": info["weight_bytes"] / 2**30,
            "batch1_tok_s": best1, f"batch{args.batch}_tok_s": best64,
            "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="gpu_quant.json")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="weavelm_quant_")
    rows = []
    for name in args.variants:
        try:
            rows.append(run_variant(name, model_dir(args.shape, VARIANTS[name][0], root), args))
        except Exception as e:  # a variant that cannot run here is reported, not fatal
            rows.append({"variant": name, "error": f"{type(e).__name__}: {e}"})
        print(rows[-1], flush=True)
    card = torch.cuda.get_device_name()
    with open(args.out, "w") as f:
        json.dump({"shape": args.shape, "card": card, "prompt_len": args.prompt_len, "output_len": args.output_len,
                   "batch": args.batch, "rows": rows}, f, indent=2)
    print(f"\n{args.shape} on {card}, prompt {args.prompt_len}, output {args.output_len}")
    print(f"| variant | methods | weights GiB | batch-1 tok/s | batch-{args.batch} tok/s | peak alloc GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | error: {r['error'][:80]} | | | | |")
        else:
            print(f"| {r['variant']} | {r['quantization'] or 'dense'} | {r['weight_gib']:.2f} | "
                  f"{r['batch1_tok_s']:.1f} | {r[f'batch{args.batch}_tok_s']:.1f} | {r['peak_alloc_gib']:.2f} |")


if __name__ == "__main__":
    main()
