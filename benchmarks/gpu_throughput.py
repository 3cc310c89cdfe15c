"""nano-vllm's throughput workload on a Qwen3-0.6B-shaped model (random weights, bf16): weavelm vs transformers.

Run on the GPU machine from the repo root (weavelm importable, its entry points visible, e.g. weavelm.egg-info
carried beside the package):
    python benchmarks/gpu_throughput.py --out bench_out/gpu_throughput.json \
        --variant auto --variant torch_ref:attention=torch_ref --variant triton:attention=triton \
        --variant triton-eager:attention=triton,enforce_eager=true
CPU smoke test (tiny Qwen3, tiny workload, a few seconds):
    python benchmarks/gpu_throughput.py --device cpu --tiny --out bench_out/gpu_throughput_cpu.json

The model is a seeded transformers Qwen3 model saved with save_pretrained (bf16, tied embeddings) to --model-dir;
both weavelm (loader safetensors) and transformers load that same folder. The workload (256 requests, prompt and
output lengths uniform in 100..1024, random token ids, ignore_eos) is drawn once and saved beside the results; each
weavelm variant and the transformers run execute in their own child process, so one failing or leaking variant
cannot spoil the others. transformers runs batched `generate` (left padding, every row generates its batch's
longest output); its tok/s counts only the tokens the workload asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                 rope_theta=1e6, max_position_embeddings=40960, rms_norm_eps=1e-6)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True, rope_theta=1e6,
            max_position_embeddings=512, rms_norm_eps=1e-6)


def child_make_model(job: dict) -> dict:
    """Save a seeded random Qwen3 model (config.json + safetensors), initialised on the run's device."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(**(TINY if job["tiny"] else QWEN3_06B), bos_token_id=1, eos_token_id=2,
                      initializer_range=0.3 if job["tiny"] else 0.02)
    torch.manual_seed(job["seed"])
    with torch.device(job["device"]):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, job["dtype"]))
    model.save_pretrained(job["model"])
    return {"num_params": sum(p.numel() for p in model.parameters())}


def parse_variant(text: str) -> dict:
    """`LABEL` or `LABEL:key=value,key=value` (keys as for --set)."""
    label, _, rest = text.partition(":")
    return {"label": label, "sets": [s for s in rest.split(",") if s]}


# -- children ---------------------------------------------------------------------------------------------------
def child_weavelm(job: dict) -> dict:
    from weavelm import LLM
    from weavelm.bench.runner import run_workload, warmup
    from weavelm.bench.workload import load_jsonl

    wl = load_jsonl(job["workload"])
    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job["dtype"], device=job["device"], loader=job["loader"],
              sets=job["sets"])
    startup = time.perf_counter() - t0
    warmup(llm.engine)
    run = run_workload(llm.engine, wl, progress=not job["quiet"], desc=job["label"])
    out = {**run.throughput(), "startup_s": startup, "config": llm.config.to_dict(), "device_name": _device_name(),
           "token_ids": [r.token_ids for r in run.records]}
    errors = [r.error for r in run.records if r.error]
    if errors:
        out["first_error"] = errors[0]
    llm.shutdown()
    return out


def child_hf(job: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from weavelm.bench.workload import load_jsonl

    items = load_jsonl(job["workload"]).items[: job["hf_num_prompts"] or None]
    device = torch.device(job["device"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=getattr(torch, job["dtype"])).to(device).eval()
    order = list(range(len(items)))
    if job["hf_sort"]:
        order.sort(key=lambda i: len(items[i].prompt_token_ids) + items[i].max_tokens)
    batches = [order[i:i + job["hf_max_batch"]] for i in range(0, len(order), job["hf_max_batch"])]
    gen_kw = dict(do_sample=False, pad_token_id=0)
    if job["hf_cache"]:
        gen_kw["cache_implementation"] = job["hf_cache"]

    def generate(rows: list[list[int]], new: int):
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                  **gen_kw)[:, width:]

    generate([[1, 2, 3, 4], [5, 6]], 4)  # warm-up
    token_ids: list[list[int]] = [[] for _ in items]
    wall, generated = 0.0, 0
    from tqdm import tqdm
    for batch in tqdm(batches, desc="transformers", unit="batch", disable=job["quiet"]):
        new = max(items[i].max_tokens for i in batch)
        _sync(device)
        t0 = time.perf_counter()
        out = generate([items[i].prompt_token_ids for i in batch], new)
        _sync(device)
        wall += time.perf_counter() - t0
        generated += out.numel()
        for row, i in zip(out.tolist(), batch):
            token_ids[i] = row[: items[i].max_tokens]
    prompt = sum(len(i.prompt_token_ids) for i in items)
    output = sum(i.max_tokens for i in items)
    return {"num_requests": len(items), "num_errors": 0, "prompt_tokens": prompt, "output_tokens": output,
            "generated_tokens_incl_padding": generated, "wall_s": wall, "output_tok_s": output / wall,
            "total_tok_s": (prompt + output) / wall, "req_s": len(items) / wall, "num_batches": len(batches),
            "max_batch": job["hf_max_batch"], "device_name": _device_name(), "token_ids": token_ids}


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def _device_name() -> str:
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


# -- parent -----------------------------------------------------------------------------------------------------
def run_child(kind: str, job: dict, timeout: int, script: str = __file__) -> dict:
    """Run `script --child KIND JOB RESULT` (this file by default; other benchmarks reuse the protocol)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
        job_path = f.name
    result_path = job_path + ".out"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, script, "--child", kind, job_path, result_path], timeout=timeout,
                              stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout} s"}
    if proc.returncode != 0 or not os.path.exists(result_path):
        sys.stderr.write(proc.stderr)
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return {"status": "failed: " + tail[0][:300]}
    with open(result_path) as f:
        out = json.load(f)
    out["status"] = "ok"
    out["child_wall_s"] = time.perf_counter() - t0
    return out


def prepare_model_and_workload(args, dtype: str, prefix: str):
    """The random model (made in a child process unless `--model-dir` holds one) and nano-vllm's workload drawn for
    its vocabulary, saved as JSONL: (work dir, model dir, config dict, workload, workload path), or None when the
    model could not be made (the reason is printed)."""
    from weavelm.bench.workload import parse_range, random_workload, save_jsonl

    num = args.num_prompts or (8 if args.tiny else 256)
    inp = parse_range(args.input_len or ("8:48" if args.tiny else "100:1024"))
    outl = parse_range(args.output_len or ("4:24" if args.tiny else "100:1024"))
    work = tempfile.mkdtemp(prefix=prefix)
    model = args.model_dir or os.path.join(work, "model")
    if not os.path.isfile(os.path.join(model, "config.json")):
        made = run_child("make", dict(model=model, tiny=args.tiny, dtype=dtype, seed=args.seed,
                                      device=args.device), args.child_timeout)
        if made["status"] != "ok":
            print(f"error: cannot make the model: {made['status']}", file=sys.stderr)
            return None
    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    wl = random_workload(num, inp, outl, cfg["vocab_size"], cfg["max_position_embeddings"], args.seed)
    wl_path = os.path.join(work, "workload.jsonl")
    save_jsonl(wl, wl_path)
    return work, model, cfg, wl, wl_path


def agreement_vs(ref: list[list[int]], other: list[list[int]]) -> dict:
    from weavelm.bench.ab import agreement
    n = min(len(ref), len(other))
    ag = agreement(ref[:n], other[:n])
    first = sum(1 for a, b in zip(ref[:n], other[:n]) if a[:1] == b[:1]) / n if n else None
    return {"identical_share": ag["identical_share"], "first_token_share": first,
            "first_divergence_median": ag["first_divergence_median"]}


def table(results: list[dict]) -> str:
    hf = next((r for r in results if r["name"] == "transformers" and r["status"] == "ok"), None)
    head = ("system", "status", "reqs", "out tok", "wall s", "out tok/s", "total tok/s", "req/s", "vs HF")
    rows = [head]
    for r in results:
        if r["status"] != "ok":
            rows.append((r["name"], r["status"][:60], *["-"] * 7))
            continue
        vs = f"{r['output_tok_s'] / hf['output_tok_s']:.2f}x" if hf else "-"
        rows.append((r["name"], "ok", str(r["num_requests"]), str(r["output_tokens"]), f"{r['wall_s']:.2f}",
                     f"{r['output_tok_s']:.1f}", f"{r['total_tok_s']:.1f}", f"{r['req_s']:.2f}", vs))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny Qwen3 and a tiny workload (CPU smoke test)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dtype", default=None, help="default bfloat16 (float32 with --tiny)")
    p.add_argument("--model-dir", help="where the random model is saved/reused (default: a temp dir)")
    p.add_argument("--loader", default="safetensors", help="weavelm loader for the saved model")
    p.add_argument("--num-prompts", type=int)
    p.add_argument("--input-len", help="LO:HI (default 100:1024; 8:48 with --tiny)")
    p.add_argument("--output-len", help="LO:HI (default 100:1024; 4:24 with --tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", action="append", metavar="LABEL[:K=V,...]",
                   help="a weavelm composition, --set style overrides (repeatable; default: auto)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="override for every variant")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--hf-max-batch", type=int, default=128, help="transformers generate batch size")
    p.add_argument("--hf-num-prompts", type=int, default=0, help="run transformers on the first N only (0: all)")
    p.add_argument("--hf-sort", action="store_true", help="batch transformers requests by length")
    p.add_argument("--hf-cache", help="transformers cache_implementation, e.g. static")
    p.add_argument("--child-timeout", type=int, default=480, help="seconds per variant")
    p.add_argument("--out", default="bench_out/gpu_throughput.json")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, job_path, result_path = args.child
        with open(job_path) as f:
            job = json.load(f)
        result = {"weavelm": child_weavelm, "hf": child_hf, "make": child_make_model}[kind](job)
        with open(result_path, "w") as f:
            json.dump(result, f)
        return 0

    from weavelm.bench.report import write_json
    from weavelm.bench.throughput import platform_info

    dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    setup = prepare_model_and_workload(args, dtype, "weavelm_gpu_tp_")
    if setup is None:
        return 2
    work, model, cfg, wl, wl_path = setup
    base = dict(model=model, dtype=dtype, device=args.device, workload=wl_path, quiet=args.quiet)
    variants = [parse_variant(v) for v in (args.variant or ["auto"])]
    results = []
    for v in variants:
        print(f"== weavelm {v['label']} {' '.join(v['sets'])}", file=sys.stderr)
        job = {**base, "label": v["label"], "loader": args.loader, "sets": args.sets + v["sets"]}
        results.append({"name": f"weavelm {v['label']}", "sets": job["sets"],
                        **run_child("weavelm", job, args.child_timeout)})
    if not args.no_hf:
        print("== transformers generate", file=sys.stderr)
        job = {**base, "hf_max_batch": args.hf_max_batch, "hf_num_prompts": args.hf_num_prompts,
               "hf_sort": args.hf_sort, "hf_cache": args.hf_cache}
        results.append({"name": "transformers", **run_child("hf", job, args.child_timeout)})
    ref = next((r for r in results if r["status"] == "ok" and r["name"] == "transformers"), None)
    for r in results:
        if r["status"] == "ok" and ref is not None and r is not ref:
            r["agreement_vs_transformers"] = agreement_vs(ref["token_ids"], r["token_ids"])
    for r in results:
        r.pop("token_ids", None)
    host = platform_info(argparse.Namespace(device="cpu"))  # the parent never touches the GPU
    host["device"] = next((r["device_name"] for r in results if r.get("device_name")), args.device)
    report = {"bench": "gpu_throughput", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": host,
              "transformers": __import__("transformers").__version__, "command": " ".join(sys.argv),
              "model": "tiny qwen3" if args.tiny else "Qwen3-0.6B shape, random weights", "dtype": dtype,
              "workload": wl.describe(), "results": results}
    write_json(report, args.out)
    print(f"{report['model']}, {dtype}, {host['device']}; workload {wl.source}")
    print(table(results))
    for r in results:
        if "agreement_vs_transformers" in r:
            a = r["agreement_vs_transformers"]
            print(f"{r['name']}: first token equal to transformers in {100 * a['first_token_share']:.0f}% of "
                  f"requests, whole output in {100 * a['identical_share']:.0f}%")
    print(f"wrote {args.out}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
