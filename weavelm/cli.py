"""`weavelm generate | plugins | convert | bench | ab`."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from weavelm.errors import WeaveError


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The options every engine-building command takes."""
    g = p.add_argument_group("engine")
    g.add_argument("--config", metavar="FILE", help="engine YAML (see examples/)")
    g.add_argument("--set", dest="sets", action="append", default=[], metavar="A.B=C",
                   help="override a config value, e.g. --set scheduler.max_num_seqs=8 (repeatable)")
    g.add_argument("--model", help="model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"))
    g.add_argument("--device", choices=("auto", "cuda", "cpu"))


def engine_config_from_args(args: argparse.Namespace, **extra: Any):
    """EngineConfig from --config, the shortcuts and --set, in that order of precedence (last wins)."""
    from weavelm.core.config import EngineConfig, merge_overrides, read_yaml

    raw = read_yaml(args.config) if args.config else {}
    shortcuts = {"model": args.model, "dtype": args.dtype, "device": args.device, **extra}
    return EngineConfig.build(merge_overrides(raw, shortcuts, args.sets))


def cmd_generate(args: argparse.Namespace) -> int:
    from weavelm import LLM, SamplingParams

    llm = LLM(config=engine_config_from_args(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop or None, ignore_eos=args.ignore_eos)
    prompts = args.prompt or ["The capital of France is"]
    for prompt in prompts:
        if args.chat:
            tok = llm.get_tokenizer()
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=False)
            request: Any = {"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)}
        else:
            request = prompt
        if args.stream:
            printed = 0
            for out in llm.stream(request, params):
                text = out.outputs[0].text
                sys.stdout.write(text[printed:])
                sys.stdout.flush()
                printed = len(text)
            sys.stdout.write("\n")
        else:
            out = llm.generate([request], params)[0]
            if out.error:
                print(f"error: {out.error}", file=sys.stderr)
                return 2
            print(out.outputs[0].text if args.chat else prompt + out.outputs[0].text)
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from weavelm.core.registry import Registry

    reg = Registry.load()
    rows = [("kind", "name", "distribution", "version", "api", "status")]
    for kind, comps in reg.components.items():
        for name, rec in sorted(comps.items()):
            api = reg.plugins[rec.plugin].api_version if rec.plugin in reg.plugins else ""
            rows.append((kind, name, rec.distribution, rec.version, api or "undeclared", "ok"))
    for p in sorted(reg.plugins.values(), key=lambda p: p.name):
        if p.error:
            rows.append(("?", p.name, p.distribution, p.version, p.api_version or "undeclared", f"failed: {p.error}"))
    for (kind, name), dists in sorted(reg.clashes.items()):
        rows.append((kind, name, " & ".join(dists), "", "", "clash: two distributions claim this name"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weavelm", description="A plugin-based LLM inference engine.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one or more prompts")
    add_engine_args(g)
    g.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    g.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.set_defaults(handler=cmd_generate)

    p = sub.add_parser("plugins", help="list every component with its distribution and status")
    p.set_defaults(handler=cmd_plugins)

    from weavelm.convert import add_convert_parser
    add_convert_parser(sub)
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
