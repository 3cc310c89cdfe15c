"""Load test of `weavelm serve`: Poisson arrivals at several request rates, streaming /v1/completions.

Reports per rate: achieved requests/s, TTFT and inter-token latency p50/p90/p99, output tok/s; prints a table and
writes JSON. `--offline` also runs the same workload through `LLM.generate` (the saturation reference: the server
at rate `inf` should keep >= 90% of its output tok/s).

  # against a running server
  python benchmarks/serve_load.py --url http://127.0.0.1:8000 --rates 2,8,inf --num-requests 64
  # start one (CPU tiny model), then compare with offline
  python benchmarks/serve_load.py --model DIR --dtype float32 --device cpu --rates 4,16,inf --offline
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import time

import httpx
import numpy as np


def workload(num: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(input_len)] for _ in range(num)]


async def one_request(http: httpx.AsyncClient, prompt: list[int], args) -> dict:
    body = {"model": args.model_name, "prompt": prompt, "max_tokens": args.output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times, tokens = [], 0
    async with http.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            return {"error": resp.status_code}
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event.get("choices"):
                choice = event["choices"][0]
                if choice.get("text") or choice.get("finish_reason") is None:  # a token (text may be empty
                    times.append(time.perf_counter())                            # without a tokenizer)
    if not times:
        return {"error": "no tokens"}
    gaps = np.diff(times).tolist()
    return {"ttft": times[0] - start, "itl": gaps, "e2e": times[-1] - start, "tokens": tokens, "events": len(times)}


async def _drive(url: str, prompts: list[list[int]], rate: float, args, seed: int) -> dict:
    """One client process's share: Poisson arrivals at `rate`, every request streamed to its end."""
    rng = np.random.default_rng(seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=64)
    cpu0 = time.process_time()
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=3600) as http:
        tasks = []
        t0 = time.perf_counter()  # CLOCK_MONOTONIC: comparable across the client processes
        for prompt in prompts:
            tasks.append(asyncio.create_task(one_request(http, prompt, args)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.exponential(1.0 / rate))
        results = await asyncio.gather(*tasks)
        t1 = time.perf_counter()
    return {"t0": t0, "t1": t1, "results": results, "cpu_s": time.process_time() - cpu0}


def _drive_in_process(job: tuple) -> dict:
    return asyncio.run(_drive(*job))


def _cpu_seconds(pid: int | None) -> dict[str, float]:
    """CPU seconds (user + system) of the server process and of its children (engine core, workers)."""
    if pid is None:
        return {}
    import psutil

    try:
        proc = psutil.Process(pid)
        out = {"server": sum(proc.cpu_times()[:2])}
        for child in proc.children(recursive=True):
            out[f"child:{child.name()}:{child.pid}"] = sum(child.cpu_times()[:2])
        return out
    except psutil.Error:
        return {}


def run_rate(url: str, prompts: list[list[int]], rate: float, args, server_pid: int | None = None) -> dict:
    """Drive `prompts` at `rate` from `args.client_procs` processes (each a Poisson stream at rate/N, so together
    Poisson at `rate`): one Python client parsing SSE tops out near 10k tokens/s and would measure itself."""
    n = max(1, min(args.client_procs, len(prompts)))
    jobs = [(url, prompts[i::n], rate / n, args, args.seed + i) for i in range(n)]
    cpu_before = _cpu_seconds(server_pid)
    if n == 1:
        parts = [_drive_in_process(jobs[0])]
    else:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(n) as pool:
            parts = pool.map(_drive_in_process, jobs)
    cpu_after = _cpu_seconds(server_pid)
    wall = max(p["t1"] for p in parts) - min(p["t0"] for p in parts)
    results = [r for p in parts for r in p["results"]]
    ok = [r for r in results if "error" not in r]

    def pct(values: list[float]) -> dict:
        if not values:
            return {"p50": None, "p90": None, "p99": None}
        return {f"p{q}": float(np.percentile(values, q)) * 1000 for q in (50, 90, 99)}

    cpu = {k: round(v - cpu_before.get(k, 0.0), 2) for k, v in cpu_after.items()}
    return {"rate": rate, "requests": len(prompts), "ok": len(ok), "wall_s": wall, "req_per_s": len(ok) / wall,
            "output_tok_per_s": sum(r["tokens"] for r in ok) / wall, "client_procs": n,
            "client_cpu_s": round(sum(p["cpu_s"] for p in parts), 2), "server_cpu_s": cpu,
            "ttft_ms": pct([r["ttft"] for r in ok]), "itl_ms": pct([x for r in ok for x in r["itl"]]),
            # tokens per SSE event: above 1 when the server coalesces the tokens of several steps into one event
            "tokens_per_event": sum(r["tokens"] for r in ok) / max(1, sum(r["events"] for r in ok))}


def run_offline(prompts: list[list[int]], args) -> dict:
    from weavelm import LLM, SamplingParams

    if args.num_threads:
        import torch
        torch.set_num_threads(args.num_threads)
    llm = LLM(model=args.model, dtype=args.dtype, device=args.device, num_threads=args.num_threads or None,
              sets=args.set)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:4]], params)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    wall = time.perf_counter() - t0
    llm.shutdown()
    return {"requests": len(prompts), "wall_s": wall, "req_per_s": len(prompts) / wall,
            "output_tok_per_s": sum(len(o.outputs[0].token_ids) for o in outs) / wall}


def _start_py_spy(path: str, pid: int | None) -> subprocess.Popen | None:
    """Sample the server and its engine-core process (py-spy, a sampling profiler) during the last rate."""
    import shutil

    if pid is None:
        sys.exit("--py-spy needs a server started here (--model, not --url)")
    if shutil.which("py-spy") is None:
        print("--py-spy: py-spy is not on PATH (pip install py-spy); not profiling", file=sys.stderr)
        return None
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--subprocesses", "--format", "raw", "--rate",
                             "250", "--nonblocking", "-o", path], stdout=subprocess.DEVNULL)


def start_server(args) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "weavelm.cli", "serve", "--model", args.model, "--dtype", args.dtype, "--device",
           args.device, "--port", str(port), "--log-level", "warning", "--served-model-name", args.model_name]
    for s in args.set:
        cmd += ["--set", s]
    if args.api_server_count > 1:
        cmd += ["--api-server-count", str(args.api_server_count)]
    if args.num_threads:
        cmd += ["--num-threads", str(args.num_threads)]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.terminate()
    sys.exit("server did not start")


def print_table(rows: list[dict], offline: dict | None) -> None:
    head = f"{'rate':>6} {'req/s':>7} {'tok/s':>8} {'TTFT p50':>9} {'p90':>8} {'p99':>8} {'ITL p50':>8} {'p90':>7} " \
           f"{'p99':>7}  (ms)"
    print(head)

    def ms(x):
        return f"{x:.1f}" if x is not None else "-"

    for r in rows:
        t, i = r["ttft_ms"], r["itl_ms"]
        print(f"{r['rate']:>6} {r['req_per_s']:>7.2f} {r['output_tok_per_s']:>8.1f} {ms(t['p50']):>9} "
              f"{ms(t['p90']):>8} {ms(t['p99']):>8} {ms(i['p50']):>8} {ms(i['p90']):>7} {ms(i['p99']):>7}")
    for r in rows:
        cpu = ", ".join(f"{k.split(':')[0] if k == 'server' else k.split(':')[1]} {v:.1f}" for k, v in
                        r.get("server_cpu_s", {}).items())
        print(f"rate {r['rate']}: wall {r['wall_s']:.1f} s, {r.get('tokens_per_event', 1.0):.2f} tokens per SSE "
              f"event, CPU s: clients ({r['client_procs']}) {r['client_cpu_s']:.1f}" + (f", {cpu}" if cpu else ""))
    if offline:
        sat = rows[-1]["output_tok_per_s"] if rows else 0.0
        print(f"offline LLM.generate: {offline['output_tok_per_s']:.1f} tok/s ({offline['req_per_s']:.2f} req/s); "
              f"server at rate {rows[-1]['rate'] if rows else '-'}: {sat / offline['output_tok_per_s']:.1%} of it")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server; default: start one with --model")
    p.add_argument("--model", help="model directory (to start a server and for --offline)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--set", action="append", default=[], help="engine --set overrides (repeatable)")
    p.add_argument("--api-server-count", type=int, default=1, help="API-server processes of the server started here")
    p.add_argument("--num-threads", type=int, help="torch CPU threads of the server and the offline run")
    p.add_argument("--model-name", default="bench")
    p.add_argument("--api-key", default=os.environ.get("WEAVELM_API_KEY"))
    p.add_argument("--rates", default="2,8,inf", help="requests/s, comma-separated; inf = all at once")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000, help="prompt token ids are drawn below this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--offline", action="store_true", help="also run LLM.generate on the same workload")
    p.add_argument("--client-procs", type=int, default=max(1, min(4, (os.cpu_count() or 2) // 4)),
                   help="load-generator processes (default: a quarter of the cores, at most 4)")
    p.add_argument("--py-spy", metavar="FILE", help="profile the server (py-spy raw stacks) during the last rate")
    p.add_argument("--json", default="serve_load.json")
    args = p.parse_args()
    if not args.url and not args.model:
        p.error("give --url or --model")
    prompts = workload(args.num_requests, args.input_len, args.vocab, args.seed)
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args)
    try:
        pid = proc.pid if proc is not None else None
        run_rate(url, prompts[:8], math.inf, args, pid)  # warm-up
        rates = [float(r) for r in args.rates.split(",")]
        rows = [run_rate(url, prompts, r, args, pid) for r in rates[:-1]]
        spy = _start_py_spy(args.py_spy, pid) if args.py_spy else None
        try:
            rows.append(run_rate(url, prompts, rates[-1], args, pid))
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    offline = run_offline(prompts, args) if args.offline else None
    print_table(rows, offline)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "argv": sys.argv, "rows": rows, "offline": offline}
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
