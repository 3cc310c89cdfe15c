"""Expert parallelism on the GPU machine (2+ GPUs): decode tok/s of a Qwen3-30B-A3B-shaped MoE (random bf16
weights, dummy loader) with `tensor_parallel_size=N` sharding every expert vs `enable_expert_parallel=True` (whole
experts per rank), then the dispatch micro-benchmark (all-to-all vs all-gather + reduce-scatter, nccl).

    python benchmarks/gpu_moe_ep.py --tp 2 --out $OUT/gpu_moe_ep.json
    python benchmarks/gpu_moe_ep.py --tp 2 --layers 24 --out $OUT/gpu_moe_ep.json     # if memory is short

Each engine runs in its own child process (GPU memory is released between them); tok/s as in gpu_moe.py (decode
only: a run of 2 x output_len minus a run of output_len).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def child(args: argparse.Namespace, expert: bool, path: str) -> dict:
    from gpu_moe import decode_tok_s

    from weavelm import LLM

    max_bs = max(args.batches)
    llm = LLM(model=path, dtype="bfloat16", device="cuda", loader="dummy", tensor_parallel_size=args.tp,
              enable_expert_parallel=expert, max_model_len=args.prompt_len + 2 * args.output_len + 16,
              scheduler={"max_num_seqs": max_bs, "max_num_batched_tokens": max(2048, max_bs * args.prompt_len)})
    try:
        return {"enable_expert_parallel": expert, "tp": args.tp,
                "decode_tok_s": {b: decode_tok_s(llm, b, args) for b in args.batches}}
    finally:
        llm.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", choices=("tp", "ep"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="gpu_moe_ep.json")
    args = ap.parse_args()
    args.vocab = 151936
    if args.child:
        print(json.dumps(child(args, args.child == "ep", args.model)), flush=True)
        return
    from gpu_moe import write_config

    path = write_config("qwen3-30b-a3b", args.layers, tempfile.mkdtemp())
    rows = []
    for mode in ("tp", "ep"):
        cmd = [sys.executable, __file__, "--child", mode, "--model", path, "--tp", str(args.tp),
               "--batches", *map(str, args.batches), "--prompt-len", str(args.prompt_len), "--output-len",
               str(args.output_len), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            rows.append({"mode": mode, "error": out.stderr[-3000:]})
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    dispatch_out = os.path.join(os.path.dirname(os.path.abspath(args.out)), "moe_ep_dispatch_cuda.json")
    subprocess.run([sys.executable, os.path.join(HERE, "moe_ep_dispatch.py"), "--device", "cuda", "--world",
                    str(args.tp), "--shape", "qwen3-30b-a3b", "--tokens", "1", "16", "128", "1024",
                    "--out", dispatch_out], check=False)
    with open(args.out, "w") as f:
        json.dump({"engines": rows, "dispatch": dispatch_out}, f, indent=1)


if __name__ == "__main__":
    main()
