"""Decode speed of a mixture-of-experts model with random weights (default: Qwen3-30B-A3B's shape, bf16, CUDA) at
batch 1 and 64, and the share of each decode step spent in the MoE grouped-GEMM kernel (torch profiler).

Prints a table and writes JSON. Decode tok/s is measured without prefill: each batch is generated twice, with
`--output-len` and with twice that, and tok/s = batch * output_len / (t_long - t_short). The profile (eager rows:
with CUDA graphs the kernels are hidden in graph replays) covers `--profile-steps` decode steps at the same batch; on
CUDA the kernel share is the device time of `_grouped_gemm_kernel` (both projections, all experts) over all device
time, and the layer share the time inside `FusedMoE.forward` (router, top-k, alignment, the GEMMs, SiLU, sum) measured
with CUDA events; on the CPU both are wall-time shares of the layer (the CPU path has no Triton kernel).

  python benchmarks/gpu_moe.py --out moe.json                       # Qwen3-30B-A3B shape, 48 layers, ~61 GB bf16
  python benchmarks/gpu_moe.py --layers 24 --out moe.json           # half the layers, if the card is short of memory
  python benchmarks/gpu_moe.py --shape tiny --device cpu --out /tmp/moe.json   # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time

import torch

SHAPES = {
    "qwen3-30b-a3b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, vocab_size=151936, num_experts=128,
                          num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                          max_position_embeddings=40960, rope_theta=1e6, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, num_experts=8, num_experts_per_tok=2,
                 moe_intermediate_size=32, norm_topk_prob=True, max_position_embeddings=2048,
                 tie_word_embeddings=False),
}


def write_config(shape: str, layers: int | None, path: str) -> str:
    from transformers import Qwen3MoeConfig

    kw = dict(SHAPES[shape])
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = Qwen3MoeConfig(**kw)
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    cfg.save_pretrained(path)
    return path


def _model(llm):
    return llm.engine.client.core.executor.worker.runner.bundle.model


def _prompts(batch: int, prompt_len: int, vocab: int) -> list[dict]:
    return [{"prompt_token_ids": [(7 + 13 * b + 3 * i) % (vocab - 3) + 3 for i in range(prompt_len)]}
            for b in range(batch)]


def _timed_generate(llm, prompts, max_tokens: int) -> float:
    from weavelm import SamplingParams

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    sync()
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
    return time.perf_counter() - t0


def decode_tok_s(llm, batch: int, args) -> float:
    prompts = _prompts(batch, args.prompt_len, args.vocab)
    _timed_generate(llm, prompts, 4)  # warm up (compiles, CUDA graphs)
    best = 0.0
    for _ in range(args.repeats):
        short = _timed_generate(llm, prompts, args.output_len)
        long = _timed_generate(llm, prompts, 2 * args.output_len)
        best = max(best, batch * args.output_len / max(long - short, 1e-9))
    return best


class _LayerTimer:
    """Forward pre/post hooks on every FusedMoE: time inside the layer (CUDA events on CUDA, wall clock on CPU)."""

    def __init__(self, model, cuda: bool):
        from weavelm.layers import FusedMoE

        self.cuda, self.spans, self.handles = cuda, [], []
        for m in model.modules():
            if isinstance(m, FusedMoE):
                self.handles.append(m.register_forward_pre_hook(self._start))
                self.handles.append(m.register_forward_hook(self._stop))

    def _start(self, module, args):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._open = ev
        else:
            self._open = time.perf_counter()

    def _stop(self, module, args, out):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.spans.append((self._open, ev))
        else:
            self.spans.append((self._open, time.perf_counter()))

    def total_s(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.spans) / 1e3
        return sum(b - a for a, b in self.spans)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def profile_decode(llm, batch: int, args) -> dict:
    """Per decode step: wall time, device kernel time, the grouped-GEMM kernel's and the FusedMoE layer's shares,
    and the top kernels (prefill excluded: the profile covers a run minus a run of one token)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device == "cuda"
    prompts = _prompts(batch, args.prompt_len, args.vocab)
    steps = args.profile_steps
    result = {}
    for tokens in (1, steps + 1):  # the difference is `steps` decode steps
        timer = _LayerTimer(_model(llm), cuda)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            wall = _timed_generate(llm, prompts, tokens)
        layer_s = timer.total_s()
        timer.close()
        kernels: dict[str, float] = {}
        if cuda:
            for e in prof.events():
                if e.device_type.name == "CUDA":
                    kernels[e.name[:90]] = kernels.get(e.name[:90], 0.0) + e.device_time / 1e6
        result[tokens] = (wall, layer_s, kernels)
    (w1, l1, k1), (w2, l2, k2) = result[1], result[steps + 1]
    kernels = {k: (v - k1.get(k, 0.0)) / steps for k, v in k2.items()}
    kernel_s = sum(kernels.values())
    gemm_s = sum(v for k, v in kernels.items() if "grouped_gemm" in k)
    wall_s, layer_s = (w2 - w1) / steps, (l2 - l1) / steps
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    return {"wall_ms_per_step": wall_s * 1e3, "kernel_ms_per_step": kernel_s * 1e3 if cuda else None,
            "moe_gemm_ms_per_step": gemm_s * 1e3 if cuda else None,
            "moe_gemm_share_of_kernels": gemm_s / kernel_s if cuda and kernel_s > 0 else None,
            "moe_layer_ms_per_step": layer_s * 1e3,
            "moe_layer_share": layer_s / (kernel_s if cuda and kernel_s > 0 else wall_s),
            "top_kernels_us": [(k, round(v * 1e6, 1)) for k, v in top]}


def run_mode(path: str, eager: bool, args) -> list[dict]:
    from weavelm import LLM

    max_bs = max(args.batches)
    llm = LLM(model=path, dtype=args.dtype, device=args.device, loader="dummy", attention=args.attention,
              enforce_eager=eager, max_model_len=args.prompt_len + 2 * args.output_len + 16,
              scheduler={"max_num_seqs": max_bs, "max_num_batched_tokens": max(2048, max_bs * args.prompt_len)},
              **({"model_runner": {"cuda_graph_max_bs": max_bs}} if args.device == "cuda" else {}))
    rows = []
    try:
        for batch in args.batches:
            row = {"batch": batch, "cuda_graphs": not eager and args.device == "cuda",
                   "decode_tok_s": decode_tok_s(llm, batch, args)}
            if eager and args.profile_steps:
                row["profile"] = profile_decode(llm, batch, args)
            rows.append(row)
            print(row, flush=True)
    finally:
        llm.shutdown()
        del llm
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (memory)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--graphs", choices=("both", "on", "off"), default="both",
                    help="CUDA graphs on, off (eager: profiled) or both")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--profile-steps", type=int, default=16, help="decode steps profiled per eager row (0: none)")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="gpu_moe.json")
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.vocab = SHAPES[args.shape]["vocab_size"]
    path = write_config(args.shape, args.layers, tempfile.mkdtemp(prefix="weavelm_moe_shape_"))
    modes = {"both": [False, True], "on": [False], "off": [True]}[args.graphs if args.device == "cuda" else "off"]
    rows = []
    for eager in modes:
        try:
            rows += run_mode(path, eager, args)
        except Exception as e:  # report, do not lose the other mode's rows
            rows.append({"cuda_graphs": not eager, "error": f"{type(e).__name__}: {e}"})
            print(rows[-1], flush=True)
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    shape = dict(SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers else {}))
    result = {"shape": args.shape, "config": shape, "card": card, "dtype": args.dtype, "attention": args.attention,
              "prompt_len": args.prompt_len, "output_len": args.output_len, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nMoE decode, {args.shape} ({shape['num_hidden_layers']} layers, {shape['num_experts']} experts, top "
          f"{shape['num_experts_per_tok']}), {args.dtype}, {card}, prompt {args.prompt_len}")
    print(f"{'batch':>6}{'graphs':>8}{'tok/s':>11}{'ms/step':>10}{'gemm share':>12}{'layer share':>13}")
    for r in rows:
        if "error" in r:
            print(f"{'':>6}{str(r['cuda_graphs']):>8}  error: {r['error'][:90]}")
            continue
        p = r.get("profile") or {}
        gemm = p.get("moe_gemm_share_of_kernels")
        layer = p.get("moe_layer_share")
        print(f"{r['batch']:>6}{str(r['cuda_graphs']):>8}{r['decode_tok_s']:>11.1f}"
              f"{1000 * r['batch'] / r['decode_tok_s']:>10.2f}"
              f"{'' if gemm is None else f'{100 * gemm:.1f}%':>12}{'' if layer is None else f'{100 * layer:.1f}%':>13}")
    for r in rows:
        if r.get("profile") and r["profile"]["top_kernels_us"]:
            print(f"top kernels per decode step, batch {r['batch']} (eager):")
            for name, us in r["profile"]["top_kernels_us"][:10]:
                print(f"  {us:9.1f} us  {name[:80]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
