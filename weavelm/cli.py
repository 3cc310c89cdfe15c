"""`weavelm generate | plugins | convert | bench | ab`."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from weavelm import __version__
from weavelm.errors import WeaveError


# vLLM's engine flags, mapped onto their sections by weavelm.core.compat (dest -> argparse kwargs)
VLLM_ENGINE_FLAGS: dict[str, dict[str, Any]] = {
    "tensor_parallel_size": {"type": int, "help": "executor.tensor_parallel_size (picks the multiproc executor)"},
    "gpu_memory_utilization": {"type": float, "help": "cache.gpu_memory_utilization"},
    "max_num_seqs": {"type": int, "help": "scheduler.max_num_seqs"},
    "max_num_batched_tokens": {"type": int, "help": "scheduler.max_num_batched_tokens"},
    "max_model_len": {"type": int, "help": "context limit (default: the model's)"},
    "block_size": {"type": int, "help": "cache.block_size"},
    "num_gpu_blocks_override": {"type": int, "help": "cache.num_blocks"},
    "enable_prefix_caching": {"action": argparse.BooleanOptionalAction, "help": "cache.enable_prefix_caching"},
    "enable_chunked_prefill": {"action": argparse.BooleanOptionalAction,
                               "help": "scheduler.enable_chunked_prefill"},
    "enforce_eager": {"action": "store_const", "const": True, "help": "disable CUDA graphs"},
    "tokenizer": {"help": "tokenizer directory (default: beside the model)"},
    "runner": {"choices": ("auto", "generate", "pooling"), "help": "generate (default) or pooling: embed prompts "
               "(LLM.embed, /v1/embeddings)"},
    "enable_lora": {"action": "store_const", "const": True, "help": "serve LoRA adapters (opens the lora section)"},
    "max_loras": {"type": int, "help": "lora.max_loras (distinct adapters in one batch)"},
    "max_lora_rank": {"type": int, "help": "lora.max_lora_rank"},
    "max_cpu_loras": {"type": int, "help": "lora.max_cpu_loras (adapters kept in host memory)"},
    "lora_modules": {"nargs": "+", "metavar": "NAME=PATH", "help": "lora.adapters: PEFT adapters served by name"},
    "quantization": {"help": "the quantization plugin (auto, int8, gguf, none); vLLM's other methods are refused"},
    "trust_remote_code": {"action": "store_const", "const": True,
                          "help": "refused: weavelm never runs code shipped with a model"},
    "limit_mm_per_prompt": {"type": lambda text: _mm_limits(text), "metavar": "JSON",
                            "help": "multimodal.limit_mm_per_prompt, e.g. '{\"image\": 2}' (or image=2)"},
    "allowed_local_media_path": {"metavar": "DIR", "help": "multimodal.allowed_local_media_path (file:// images)"},
}


def _mm_limits(text: str) -> dict[str, int]:
    """vLLM's --limit-mm-per-prompt: JSON ({"image": 2}) or the older image=2,video=1."""
    import json

    try:
        value = json.loads(text) if text.lstrip().startswith("{") else \
            {k.strip(): int(v) for k, v in (item.split("=", 1) for item in text.split(",") if item.strip())}
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"expected JSON such as '{{\"image\": 2}}' ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object such as '{\"image\": 2}'")
    return value


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The options every engine-building command takes."""
    g = p.add_argument_group("engine")
    g.add_argument("--config", metavar="FILE", help="engine YAML (see examples/)")
    g.add_argument("--set", dest="sets", action="append", default=[], metavar="A.B=C",
                   help="override a config value, e.g. --set scheduler.max_num_seqs=8 (repeatable)")
    g.add_argument("--model", help="model directory, .gguf file or a Hugging Face id in the local cache "
                   "(default: SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"))
    g.add_argument("--device", choices=("auto", "cuda", "cpu"))
    v = p.add_argument_group("vLLM engine flags (each sets the config value named; --set wins over them)")
    for dest, kwargs in VLLM_ENGINE_FLAGS.items():
        v.add_argument("--" + dest.replace("_", "-"), dest=dest, default=None, **kwargs)


def engine_config_from_args(args: argparse.Namespace, **extra: Any):
    """EngineConfig from --config, the shortcuts, vLLM's flags and --set, in that order of precedence (last
    wins)."""
    from weavelm.core.compat import apply_vllm_aliases
    from weavelm.core.config import EngineConfig, merge_overrides, read_yaml
    from weavelm.core.registry import Registry

    raw = read_yaml(args.config) if args.config else {}
    shortcuts = {"model": args.model, "dtype": args.dtype, "device": args.device, **extra}
    shortcuts.update({dest: getattr(args, dest, None) for dest in VLLM_ENGINE_FLAGS})
    registry = Registry.load()
    overrides = apply_vllm_aliases(shortcuts, registry, base=raw)
    merged = merge_overrides(raw, overrides, args.sets)
    name, path = _lora_arg(args)
    if path is not None:
        lora = merged.get("lora") if isinstance(merged.get("lora"), dict) else {}
        merged["lora"] = {**lora, "adapters": {**(lora.get("adapters") or {}), name: path}}
    return EngineConfig.build(merged, registry)


def _lora_arg(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """`--lora NAME=PATH` (add the adapter and use it) or `--lora NAME` (use a configured one)."""
    spec = getattr(args, "lora", None)
    if not spec:
        return None, None
    name, sep, path = spec.partition("=")
    if not name or (sep and not path):
        from weavelm.errors import ConfigError
        raise ConfigError([("--lora", f"takes NAME=PATH (a PEFT adapter directory) or NAME (got {spec!r})")])
    return name, (path if sep else None)


def sampling_params_from_args(args: argparse.Namespace):
    """SamplingParams from generate's flags (validated here, before any model loads)."""
    from weavelm import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop or None,
                          ignore_eos=args.ignore_eos, n=args.n, min_tokens=args.min_tokens,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          repetition_penalty=args.repetition_penalty)


def cmd_generate(args: argparse.Namespace) -> int:
    from weavelm import LLM

    params = sampling_params_from_args(args)
    config = engine_config_from_args(args)
    llm = LLM(config=config)
    prompts = args.prompt or ["The capital of France is"]
    requests = [_chat_request(llm, p) if args.chat else p for p in prompts]
    echo = [""] * len(prompts) if args.chat else prompts  # the prompt is printed before its text, both ways
    lora = _lora_arg(args)[0]  # the adapter's name; the engine resolves it (an unknown name fails the request)
    if args.stream:
        for request, head in zip(requests, echo):
            sys.stdout.write(head)
            printed = [0] * params.n
            last = None
            for out in llm.stream(request, params, lora_request=lora):
                for c in out.outputs:
                    sys.stdout.write(c.text[printed[c.index]:])
                    printed[c.index] = len(c.text)
                sys.stdout.flush()
                last = out
            sys.stdout.write("\n")
            if not args.quiet and last is not None:
                print(generation_stats([last]), file=sys.stderr)
        return 0
    rc = 0
    outputs = llm.generate(requests, params, lora_request=lora,  # one batch, a progress bar for several
                           use_tqdm=len(requests) > 1 and not args.quiet)
    for out, head in zip(outputs, echo):
        if out.error:
            print(f"error: {out.error}", file=sys.stderr)
            rc = 2
            continue
        for c in out.outputs:
            print(head + c.text)
    if not args.quiet:
        print(generation_stats(outputs), file=sys.stderr)
    return rc


def generation_stats(outputs: list) -> str:
    """One line for stderr: generated tokens, tokens/s over the batch, time to first token (the request's, and
    since this process started, which is what a user waits for)."""
    import time

    done = [o for o in outputs if not o.error and o.metrics]
    if not done:
        return "[weavelm] no tokens generated"
    tokens = sum(len(c.token_ids) for o in done for c in o.outputs)
    start = min(o.metrics["arrival"] for o in done)
    span = max(o.metrics["now"] for o in done) - start
    ttft = min(o.metrics["first_token"] for o in done if o.metrics["first_token"]) - start
    line = f"[weavelm] {tokens} tokens in {span:.2f} s ({tokens / span if span > 0 else 0.0:.1f} tok/s), " \
           f"time to first token {ttft * 1000:.0f} ms"
    since = _process_age()
    if since is not None:
        first = min(o.metrics["first_token"] for o in done if o.metrics["first_token"])
        line += f" ({since - (time.perf_counter() - first):.2f} s after process start)"
    return line


def _process_age() -> float | None:
    """Seconds since this process started (Linux /proc), or None elsewhere."""
    import os

    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _chat_request(llm: Any, prompt: str) -> dict[str, Any]:
    from weavelm.chat_template import render_chat

    return render_chat(llm.get_tokenizer(), [{"role": "user", "content": prompt}])


def cmd_plugins(args: argparse.Namespace) -> int:
    from weavelm.core.registry import Registry

    reg = Registry.load()
    rows = [("kind", "name", "distribution", "version", "api", "status")]
    for kind in sorted(reg.components):
        for name, rec in sorted(reg.components[kind].items()):
            api = reg.plugins[rec.plugin].api_version if rec.plugin in reg.plugins else ""
            rows.append((kind, name, rec.distribution, rec.version, api or "undeclared", _can_run(kind, rec.cls)))
    for p in sorted(reg.plugins.values(), key=lambda p: p.name):
        if p.error:
            rows.append(("?", p.name, p.distribution, p.version, p.api_version or "undeclared", f"failed: {p.error}"))
    for (kind, name), dists in sorted(reg.clashes.items()):
        rows.append((kind, name, " & ".join(dists), "", "", "clash: two distributions claim this name"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])
    return 0


def _can_run(kind: str, cls: Any) -> str:
    """"ok", or "cannot run here: <reasons>" for an attention backend whose `check` fails for this machine's
    default device and dtype (a typical head layout: 64-wide heads, 8 query and 8 KV heads, 16-token blocks)."""
    if kind != "attention" or getattr(cls, "name", "") == "auto":
        return "ok"
    import torch

    from weavelm.core.device import resolve_device
    from weavelm.core.forward import AttentionSpec

    device = resolve_device("auto").type
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    try:
        reasons = cls.check(AttentionSpec(device, dtype, 64, 8, 8, 16))
    except Exception as e:  # a broken third-party check must not break the listing
        reasons = [f"check() failed: {type(e).__name__}: {e}"]
    return "ok" if not reasons else f"cannot run here ({device}, {str(dtype).removeprefix('torch.')}): " + \
        "; ".join(reasons)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weavelm", description="A plugin-based LLM inference engine.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"weavelm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one or more prompts")
    add_engine_args(g)
    g.add_argument("--prompt", action="append", help="prompt text (repeatable; all run as one batch)")
    g.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    g.add_argument("--n", type=int, default=1, help="completions per prompt (default: 1)")
    g.add_argument("--max-tokens", type=int, default=64,
                   help="tokens to generate (default: 64; SamplingParams' own default is 16)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 is greedy (default: 0; SamplingParams' own default is 1.0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0, off)")
    g.add_argument("--top-k", type=int, default=0, help="(default: 0, off)")
    g.add_argument("--min-p", type=float, default=0.0, help="(default: 0.0, off)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="(default: 0.0, off)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="(default: 0.0, off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="(default: 1.0, off)")
    g.add_argument("--min-tokens", type=int, default=0, help="tokens before EOS may end the output (default: 0)")
    g.add_argument("--seed", type=int, help="sampling seed (default: none; the engine's seed is --set seed=N)")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.add_argument("--lora", metavar="NAME=PATH", help="run the prompts on a PEFT LoRA adapter: NAME=PATH adds it "
                   "(under lora.adapters), NAME alone picks one configured there")
    g.add_argument("-q", "--quiet", action="store_true", help="do not print tokens/s and time to first token")
    g.set_defaults(handler=cmd_generate)

    p = sub.add_parser("plugins", help="list every component with its distribution and whether it can run here")
    p.set_defaults(handler=cmd_plugins)

    from weavelm.convert import add_convert_parser
    add_convert_parser(sub)
    from weavelm.serve.cli import add_serve_parser
    add_serve_parser(sub, add_engine_args)
    try:
        from weavelm.bench.cli import add_bench_parsers
    except ImportError:
        pass
    else:
        add_bench_parsers(sub, add_engine_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args) or 0
    except WeaveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
