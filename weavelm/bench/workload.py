"""Benchmark workloads: a seeded random one (nano-vllm's by default) or a JSONL file of prompts.

A workload is a list of `WorkItem`s. Random ones are drawn after the engine exists, so token ids stay inside the
model's vocabulary and every request fits `max_model_len`.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass

from weavelm.errors import RequestError

NANO_VLLM_NUM_PROMPTS = 256
NANO_VLLM_LEN_RANGE = (100, 1024)


@dataclass
class WorkItem:
    """One request: a token-id prompt (or text, tokenized by the engine) and how many tokens to generate."""

    max_tokens: int
    prompt_token_ids: list[int] | None = None
    prompt: str | None = None
    priority: int = 0

    def engine_prompt(self) -> dict:
        if self.prompt_token_ids is not None:
            return {"prompt_token_ids": self.prompt_token_ids}
        return {"prompt": self.prompt}


@dataclass
class Workload:
    items: list[WorkItem]
    source: str  # "random(seed=0, ...)" or the JSONL path
    num_clipped: int = 0  # random requests shortened to fit max_model_len

    def __len__(self) -> int:
        return len(self.items)

    def describe(self) -> dict:
        known = [len(i.prompt_token_ids) for i in self.items if i.prompt_token_ids is not None]
        outs = [i.max_tokens for i in self.items]
        return {"source": self.source, "num_requests": len(self.items), "num_clipped": self.num_clipped,
                "prompt_tokens": sum(known) if len(known) == len(self.items) else None,
                "max_output_tokens": sum(outs), "output_len_range": [min(outs), max(outs)] if outs else None,
                "prompt_len_range": [min(known), max(known)] if known else None}


def parse_range(text: str | int | tuple[int, int]) -> tuple[int, int]:
    """`"512"` -> (512, 512), `"100:1024"` or `"100-1024"` -> (100, 1024)."""
    if isinstance(text, tuple):
        lo, hi = text
    elif isinstance(text, int):
        lo = hi = text
    else:
        parts = text.replace("-", ":").split(":")
        try:
            lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
        except ValueError:
            lo = hi = None
        if lo is None:
            raise RequestError(f"length range: expected N or LO:HI (got {text!r})")
    if not 1 <= lo <= hi:
        raise RequestError(f"length range: need 1 <= LO <= HI (got {lo}:{hi})")
    return lo, hi


def random_workload(num_prompts: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab_size: int,
                    max_model_len: int, seed: int = 0) -> Workload:
    """nano-vllm's bench: lengths uniform in each range, random token ids. A request whose prompt plus output
    exceeds `max_model_len` is scaled down, both lengths alike, and counted in `num_clipped`."""
    if num_prompts < 1:
        raise RequestError(f"num_prompts: must be >= 1 (got {num_prompts})")
    if max_model_len < 2:
        raise RequestError(f"max_model_len: {max_model_len} leaves no room for a prompt and an output")
    rng = random.Random(seed)
    items, clipped = [], 0
    for _ in range(num_prompts):
        p, o = rng.randint(*input_len), rng.randint(*output_len)
        if p + o > max_model_len:
            clipped += 1
            scale = max_model_len / (p + o)
            p = max(1, min(max_model_len - 1, int(p * scale)))
            o = max(1, min(max_model_len - p, int(o * scale)))
        ids = [rng.randrange(vocab_size) for _ in range(p)]
        items.append(WorkItem(max_tokens=o, prompt_token_ids=ids))
    source = (f"random(seed={seed}, n={num_prompts}, input_len={input_len[0]}:{input_len[1]}, "
              f"output_len={output_len[0]}:{output_len[1]}, vocab={vocab_size})")
    return Workload(items, source, clipped)


def load_jsonl(path: str, default_max_tokens: int = 128) -> Workload:
    """One JSON object a line: `prompt_token_ids` (list of ints) or `prompt` (text), and optionally `max_tokens`
    (alias `output_len`) and `priority`. Blank lines are skipped."""
    items = []
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError as e:
        raise RequestError(f"workload: cannot read {path!r}: {e.strerror}") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RequestError(f"workload {path}:{n}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict) or not ("prompt_token_ids" in obj or "prompt" in obj):
            raise RequestError(f"workload {path}:{n}: each line needs `prompt_token_ids` or `prompt`")
        ids = obj.get("prompt_token_ids")
        if ids is not None and (not isinstance(ids, list) or not all(isinstance(t, int) for t in ids)):
            raise RequestError(f"workload {path}:{n}: `prompt_token_ids` must be a list of integers")
        max_tokens = obj.get("max_tokens", obj.get("output_len", default_max_tokens))
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise RequestError(f"workload {path}:{n}: `max_tokens` must be an integer >= 1 (got {max_tokens!r})")
        items.append(WorkItem(max_tokens, ids, obj.get("prompt"), int(obj.get("priority", 0))))
    if not items:
        raise RequestError(f"workload {path}: holds no requests")
    return Workload(items, path)


def save_jsonl(workload: Workload, path: str) -> None:
    with open(path, "w") as f:
        for item in workload.items:
            f.write(json.dumps({k: v for k, v in asdict(item).items() if v is not None}) + "\n")


def check_fits(workload: Workload, vocab_size: int, max_model_len: int) -> None:
    """Raise a RequestError naming the first request that this engine cannot run."""
    for i, item in enumerate(workload.items):
        ids = item.prompt_token_ids
        if ids is None:
            continue
        if any(not 0 <= t < vocab_size for t in ids):
            raise RequestError(f"workload request {i}: token ids outside this model's vocabulary [0, {vocab_size})")
        if len(ids) + item.max_tokens > max_model_len:
            raise RequestError(f"workload request {i}: {len(ids)} prompt + {item.max_tokens} output tokens exceed "
                               f"max_model_len {max_model_len}; use shorter lengths or raise max_model_len")
