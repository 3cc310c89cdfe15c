"""weavelm vs transformers `generate` vs llama.cpp on the CPU, on the default model (SmolLM2-135M-Instruct).

Same GGUF file (llama.cpp reads it directly; weavelm runs it with its blocks kept quantized; transformers runs the
same weights dequantized to fp32, from weavelm's cached conversion), same chat prompts, same thread count, 128
greedy tokens ignoring EOS. Engines run interleaved (rep 1: each engine, rep 2: each engine, ...) and the table
shows medians, because the CPU may be shared. Load time is excluded; prefill is included. llama.cpp runs batch 1
only (its Python binding has no batched generate); it comes from `llama-cpp-python`, a benchmark-only tool that is
skipped, with the reason printed, when it is not installed.

    python benchmarks/cpu_peers.py                      # threads = cores, 3 reps
    python benchmarks/cpu_peers.py --threads 1 --reps 5 --variants default,bf16,dense

Writes benchmarks/results/cpu_peers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one paragraph.",
    "Give me three tips for learning Python.",
    "What is the difference between a list and a tuple?",
    "Tell me a short story about a robot.",
    "How do airplanes stay in the air?",
    "Summarize the plot of Romeo and Juliet.",
]
VARIANTS = {  # weavelm engine overrides per variant
    "default": {},
    "bf16": {"dtype": "bfloat16"},
    "dense": {"quantization": "none"},
    "int8": {"quantization": "int8"},
}


def chat_ids(tok, prompt: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tok.encode(text, add_special_tokens=False)


class Weavelm:
    def __init__(self, variant: str, threads: int):
        from weavelm import LLM, SamplingParams
        from weavelm.default_model import default_dense_path, default_model_path

        overrides = dict(VARIANTS[variant])
        model = default_dense_path() if variant in ("dense", "int8") else default_model_path()
        self.name = f"weavelm[{variant}]"
        self.llm = LLM(model=model, device="cpu", model_runner={"cpu_threads": threads}, **overrides)
        self.params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)

    def run(self, prompts: list[list[int]]) -> int:
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], self.params)
        return sum(len(o.outputs[0].token_ids) for o in outs)


class Transformers:
    name = "transformers"

    def __init__(self, threads: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from weavelm.default_model import default_dense_path

        path = default_dense_path()
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(path)
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0

    def run(self, prompts: list[list[int]]) -> int:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=128, min_new_tokens=128,
                                      do_sample=False, pad_token_id=self.pad)
        return int((out.shape[1] - width) * out.shape[0])


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, threads: int):
        from llama_cpp import Llama

        from weavelm.default_model import default_gguf_file

        self.llm = Llama(model_path=default_gguf_file(), n_threads=threads, n_threads_batch=threads, n_ctx=512,
                         n_batch=512, verbose=False)

    def run(self, prompts: list[list[int]]) -> int:
        assert len(prompts) == 1
        self.llm.reset()
        n = 0
        for _ in self.llm.generate(prompts[0], temp=0.0, top_k=1, reset=True):
            n += 1
            if n == 128:
                break
        return n


def workloads(prompts: list[list[int]], batch: int) -> list[list[list[int]]]:
    return [prompts] if batch > 1 else [[p] for p in prompts]


def measure(engine, prompts: list[list[int]], batch: int) -> float:
    """tokens/s of one pass over the prompts (batch 1: one prompt at a time; batch 8: all at once)."""
    tokens, t0 = 0, time.perf_counter()
    for chunk in workloads(prompts, batch):
        tokens += engine.run(chunk)
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", default="default", help=f"weavelm variants, comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--skip", default="", help="engines to skip: transformers, llama.cpp; or one batch size of one "
                    "engine: transformers@1 (transformers at batch 1 takes minutes per pass)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu_peers.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from weavelm.default_model import default_dense_path
    tok = AutoTokenizer.from_pretrained(default_dense_path())
    prompts = [chat_ids(tok, p) for p in PROMPTS]

    engines = [Weavelm(v, args.threads) for v in args.variants.split(",")]
    if "transformers" not in args.skip.split(","):
        engines.append(Transformers(args.threads))
    if "llama.cpp" not in args.skip.split(","):
        try:
            engines.append(LlamaCpp(args.threads))
        except ImportError as e:
            print(f"llama.cpp skipped: llama-cpp-python is not installed ({e}); build it with "
                  f"CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install llama-cpp-python==0.3.36")
    for e in engines:  # warm-up: one short pass each
        e.run(prompts[:1])
    results: dict[str, dict[int, list[float]]] = {e.name: {1: [], 8: []} for e in engines}
    for rep in range(args.reps):
        for batch in (1, 8):
            for e in engines:
                if (batch > 1 and isinstance(e, LlamaCpp)) or f"{e.name}@{batch}" in args.skip.split(","):
                    continue
                tps = measure(e, prompts, batch)
                results[e.name][batch].append(tps)
                print(f"rep {rep + 1} batch {batch} {e.name}: {tps:.1f} tok/s", flush=True)
    med = {n: {b: statistics.median(v) if v else None for b, v in r.items()} for n, r in results.items()}
    base_tf = med.get("transformers", {})
    base_lc = med.get("llama.cpp", {})
    print(f"\nCPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads {args.threads}, "
          f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), medians of {args.reps}")
    print("| engine | batch 1 tok/s | batch 8 tok/s | b1 / llama.cpp | b8 / transformers |")
    print("|---|---:|---:|---:|---:|")
    for name, m in med.items():
        r1 = f"{m[1] / base_lc[1]:.2f}" if base_lc.get(1) and m[1] else ""
        r8 = f"{m[8] / base_tf[8]:.2f}" if base_tf.get(8) and m[8] else ""
        f8 = f"{m[8]:.1f}" if m[8] else "-"
        f1 = f"{m[1]:.1f}" if m[1] else "-"
        print(f"| {name} | {f1} | {f8} | {r1} | {r8} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"threads": args.threads, "reps": args.reps, "raw": results, "median": med,
                   "load_avg": os.getloadavg()}, f, indent=1)


if __name__ == "__main__":
    main()
