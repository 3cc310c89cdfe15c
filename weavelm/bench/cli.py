"""The `bench throughput`, `bench latency` and `ab` commands (registered by weavelm/cli.py)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from weavelm.bench.workload import NANO_VLLM_LEN_RANGE, NANO_VLLM_NUM_PROMPTS, parse_range
from weavelm.errors import RequestError


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (got {text!r})") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1 (got {text!r})")
    return values


def _range(text: str) -> tuple[int, int]:
    try:
        return parse_range(text)
    except RequestError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_workload_args(p: argparse.ArgumentParser, default_prompts: int) -> None:
    g = p.add_argument_group("workload (default: nano-vllm's seeded random one)")
    g.add_argument("--workload", metavar="FILE", help="JSONL, one request a line: prompt_token_ids or prompt, "
                   "max_tokens, priority")
    g.add_argument("--num-prompts", type=int, default=default_prompts, metavar="N")
    lo, hi = NANO_VLLM_LEN_RANGE
    g.add_argument("--input-len", type=_range, default=NANO_VLLM_LEN_RANGE, metavar="LO:HI",
                   help=f"prompt length, uniform in the range, or one number (default {lo}:{hi})")
    g.add_argument("--output-len", type=_range, default=NANO_VLLM_LEN_RANGE, metavar="LO:HI",
                   help=f"output length, uniform in the range, or one number (default {lo}:{hi})")
    g.add_argument("--seed", type=int, default=0, help="workload seed (also seeds sampling when temperature > 0)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")


def _add_output_args(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("--out", metavar="PATH", help=out_help)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or progress lines")


def _spec(args: argparse.Namespace):
    from weavelm.bench.throughput import WorkloadSpec
    return WorkloadSpec(args.workload, args.num_prompts, args.input_len, args.output_len, args.seed)


def cmd_throughput(args: argparse.Namespace) -> int:
    from weavelm import LLM
    from weavelm.bench.report import write_json
    from weavelm.bench.throughput import format_throughput, run_throughput
    from weavelm.cli import engine_config_from_args

    llm = LLM(config=engine_config_from_args(args))
    try:
        result = run_throughput(llm, _spec(args), args.temperature, progress=not args.quiet)
    finally:
        llm.shutdown()
    result["command"] = _command_line()
    print(format_throughput(result))
    if args.out:
        print(f"wrote {write_json(result, args.out)}")
    return 0


def cmd_latency(args: argparse.Namespace) -> int:
    from weavelm import LLM
    from weavelm.bench.latency import format_latency, run_latency
    from weavelm.bench.report import write_json
    from weavelm.cli import engine_config_from_args

    llm = LLM(config=engine_config_from_args(args))
    try:
        result = run_latency(llm, args.batch_sizes, args.input_len, args.output_len, args.iters,
                             args.warmup_iters, args.seed, progress=not args.quiet)
    finally:
        llm.shutdown()
    result["command"] = _command_line()
    print(format_latency(result))
    if args.out:
        print(f"wrote {write_json(result, args.out)}")
    return 0


def cmd_ab(args: argparse.Namespace) -> int:
    from weavelm.bench.ab import run_ab
    from weavelm.bench.report import ab_markdown, write_ab_outputs
    from weavelm.cli import engine_config_from_args

    labels = args.labels or _labels(args.config_a, args.config_b)
    configs = {}
    for lab, path, own_sets in ((labels[0], args.config_a, args.set_a), (labels[1], args.config_b, args.set_b)):
        ns = argparse.Namespace(config=path, model=args.model, dtype=args.dtype, device=args.device,
                                sets=list(args.sets) + list(own_sets))
        configs[lab] = engine_config_from_args(ns)
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    result = run_ab(configs, _spec(args), args.repeats, args.temperature, progress=not args.quiet, log=log)
    result["command"] = _command_line()
    paths = write_ab_outputs(result, args.out)
    print(ab_markdown(result))
    print("wrote " + ", ".join(paths.values()))
    if args.require_agreement and result["agreement"]["identical_share"] < 1.0:
        print("error: the two compositions disagree (--require-agreement)", file=sys.stderr)
        return 1
    return 0


def _labels(a: str, b: str) -> list[str]:
    la, lb = Path(a).stem, Path(b).stem
    return [la, lb] if la != lb else ["A", "B"]


def _command_line() -> str:
    return " ".join(["weavelm", *sys.argv[1:]]) if os.path.basename(sys.argv[0]) == "weavelm" else " ".join(
        sys.argv)


def add_bench_parsers(subparsers, add_engine_args: Callable[[argparse.ArgumentParser], None]) -> None:
    bench = subparsers.add_parser("bench", help="throughput and latency benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", required=True)

    t = bsub.add_parser("throughput", help="output tok/s, total tok/s, req/s on a workload")
    add_engine_args(t)
    _add_workload_args(t, NANO_VLLM_NUM_PROMPTS)
    _add_output_args(t, "write the result as JSON")
    t.set_defaults(handler=cmd_throughput)

    lat = bsub.add_parser("latency", help="TTFT, TPOT and end-to-end latency per batch size and length")
    add_engine_args(lat)
    lat.add_argument("--batch-sizes", type=_int_list, default=[1, 8, 32], metavar="B,B,...")
    lat.add_argument("--input-len", type=_int_list, default=[512], metavar="N,N,...")
    lat.add_argument("--output-len", type=_int_list, default=[128], metavar="N,N,...")
    lat.add_argument("--iters", type=int, default=3, help="timed batches per case")
    lat.add_argument("--warmup-iters", type=int, default=1, help="untimed batches per case")
    lat.add_argument("--seed", type=int, default=0)
    _add_output_args(lat, "write the result as JSON")
    lat.set_defaults(handler=cmd_latency)

    ab = subparsers.add_parser("ab", help="compare two engine compositions on one workload: speed and agreement")
    ab.add_argument("config_a", metavar="A.yaml")
    ab.add_argument("config_b", metavar="B.yaml")
    g = ab.add_argument_group("engine (applied to both sides)")
    g.add_argument("--model", help="model directory or .gguf file")
    g.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"))
    g.add_argument("--device", choices=("auto", "cuda", "cpu"))
    g.add_argument("--set", dest="sets", action="append", default=[], metavar="A.B=C", help="override, both sides")
    g.add_argument("--set-a", action="append", default=[], metavar="A.B=C", help="override, side A only")
    g.add_argument("--set-b", action="append", default=[], metavar="A.B=C", help="override, side B only")
    _add_workload_args(ab, NANO_VLLM_NUM_PROMPTS)
    ab.add_argument("--repeats", type=int, default=3, help="runs per side, interleaved A B A B (default 3)")
    ab.add_argument("--labels", nargs=2, metavar=("A", "B"), help="names in the report (default: file stems)")
    ab.add_argument("--require-agreement", action="store_true", help="exit 1 unless every output agrees")
    ab.add_argument("--out", default="ab-results", metavar="DIR", help="writes ab.json, ab.md, ab.png there")
    ab.add_argument("-q", "--quiet", action="store_true", help="no progress bars or progress lines")
    ab.set_defaults(handler=cmd_ab)
