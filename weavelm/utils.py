"""Small helpers shared by the kernel and plugins."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

CACHE_ROOT_ENV = "WEAVELM_CACHE_ROOT"


def cache_root() -> Path:
    """The one folder weavelm caches things in (the default model's converted files, the native CPU kernels):
    `$WEAVELM_CACHE_ROOT` when set (the override vLLM users know as `VLLM_CACHE_ROOT`), else `~/.cache/weavelm`."""
    root = os.environ.get(CACHE_ROOT_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "weavelm"


def cdiv(a: int, b: int) -> int:
    """Ceiling division for non-negative ints (also numpy arrays): the one formula for "blocks needed"."""
    return -(-a // b)


YOUNG_GC_THRESHOLD = 20_000


def freeze_gc_heap() -> None:
    """Collect once, then move every object alive now (the model, tokenizer, torch and library modules: the
    startup heap) to the garbage collector's permanent generation, so the oldest-generation collections a busy
    server triggers no longer scan it. Called by long-running processes once their startup is done (the server and
    the engine-core process), as vLLM does; a 2-core run of benchmarks/serve_load.py spent ~0.5 s of its frontend's
    2.7 CPU s in such collections before."""
    import gc

    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, YOUNG_GC_THRESHOLD), gen1, gen2)


class FlexibleArgumentParser(argparse.ArgumentParser):
    """vLLM's `FlexibleArgumentParser`: an ArgumentParser that also takes `--flag_name` for `--flag-name`."""

    def parse_args(self, args=None, namespace=None):  # noqa: D102
        import sys
        args = sys.argv[1:] if args is None else list(args)
        fixed = []
        for arg in args:
            if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
                key, sep, value = arg.partition("=")
                arg = key.replace("_", "-") + sep + value
            fixed.append(arg)
        return super().parse_args(fixed, namespace)
