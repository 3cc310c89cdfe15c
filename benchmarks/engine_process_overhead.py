"""Cost of the engine-process boundary (`engine_process: true`): serialisation and per-step round trips.

1. Serialisation, µs per message, encode and decode, for pickle protocol 5 and msgspec msgpack
   (`weavelm/core/serial.py`): an ADD of one request with a 1000-token prompt, and one step's OUTPUTS for 256
   decoding requests (one token each).
2. Per-step wall time of `LLMEngine.step()` (frontend output processing included) with a dummy model runner that
   samples token 1 for every scheduled request without running the model, so only the engine and the boundary
   are timed: in-process (InprocClient) vs engine process (MPClient), at 1 and 256 running requests. Plus the
   round trip of one utility call (`get_stats`) to the core process.

    python benchmarks/engine_process_overhead.py [--steps 200] [--out bench_out/engine_process_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from weavelm.core import serial  # noqa: E402
from weavelm.core.outputs import EngineCoreOutput, ModelRunnerOutput, RunnerFuture  # noqa: E402
from weavelm.core.request import Request, SamplingParams  # noqa: E402
from weavelm.plugin import hookimpl  # noqa: E402
from weavelm.plugins.workers.model_runner import PagedModelRunner  # noqa: E402

DUMMY_MODULE = "engine_process_overhead"  # this file, importable in the core process too (sys.path[0])


class DummyRunner(PagedModelRunner):
    """Samples token 1 for every scheduled request; never runs the model."""

    name = "bench_dummy"

    def execute_model_async(self, scheduler_output):
        ids = list(scheduler_output.num_scheduled_tokens)
        return RunnerFuture(ModelRunnerOutput(ids, {r: i for i, r in enumerate(ids)}, [[1] for _ in ids], None))


@hookimpl

class PickleSerializer:
    """The baseline the wire format was chosen against: the whole message pickled (protocol 5)."""

    name = "pickle5"

    def encode(self, kind: int, payload: Any) -> bytes:
        return pickle.dumps((kind, payload), protocol=5)

    def decode(self, data: bytes | memoryview) -> tuple[int, Any]:
        return pickle.loads(data)

def weavelm_register(registry) -> None:
    registry.add("model_runner", DummyRunner.name, DummyRunner)


def time_us(fn, number: int) -> float:
    """Median over 5 repeats of the mean µs per call."""
    return statistics.median(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def serialisation() -> list[dict]:
    params = SamplingParams(max_tokens=256, temperature=0.7, top_p=0.9, seed=3, stop=["\n\n"])
    req = Request("req-123456", [(17 * i) % 32000 for i in range(1000)], params, eos_token_id=2)
    add = [serial.request_to_wire(req)]
    outs = [EngineCoreOutput(f"req-{i}", [(31 * i) % 32000], num_cached_tokens=16) for i in range(256)]
    rows = []
    for ser in (PickleSerializer(), serial.MsgpackSerializer()):
        for label, kind, payload, n in (("ADD 1 request, 1000-token prompt", serial.ADD, add, 2000),
                                        ("OUTPUTS 256 requests x 1 token", serial.OUTPUTS, outs, 500)):
            data = ser.encode(kind, payload)
            rows.append({"serializer": ser.name, "message": label, "bytes": len(data),
                         "encode_us": time_us(lambda: ser.encode(kind, payload), n),
                         "decode_us": time_us(lambda: ser.decode(data), n)})
    return rows


def step_times(model: str, engine_process: bool, running: int, steps: int) -> dict:
    from weavelm import LLM
    from weavelm.core.registry import Registry

    registry = Registry.load()
    registry.register_module(DUMMY_MODULE)
    llm = LLM(model=model, dtype="float32", device="cpu", loader="safetensors", registry=registry,
              model_runner=DummyRunner.name, engine_process=engine_process,
              cache={"num_blocks": running * 8 + 64, "block_size": 16},
              scheduler={"name": "fcfs", "max_num_seqs": max(running, 1), "max_num_batched_tokens": 8192})
    engine = llm.engine
    params = SamplingParams(max_tokens=steps + 20, temperature=0.0, ignore_eos=True)
    for i in range(running):
        engine.add_request({"prompt_token_ids": [5 + i % 100] * 8}, params)
    for _ in range(10):  # prefill and warm up
        engine.step(delta=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step(delta=True)
    per_step = (time.perf_counter() - t0) / steps * 1e6
    rtt = time_us(llm.get_stats, 200) if engine_process else None
    engine.abort_request(list(engine.output_processor.states))
    while engine.has_unfinished_requests():
        engine.step()
    llm.shutdown()
    return {"client": "MPClient" if engine_process else "InprocClient", "running": running,
            "step_us": per_step, "get_stats_rtt_us": rtt}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ser = serialisation()
    print("| serializer | message | bytes | encode µs | decode µs |\n|---|---|---:|---:|---:|")
    for r in ser:
        print(f"| {r['serializer']} | {r['message']} | {r['bytes']} | {r['encode_us']:.1f} | {r['decode_us']:.1f} |")
    from tests.model_fixtures import build_tiny_model

    model = build_tiny_model("llama", tempfile.mkdtemp(prefix="weavelm-bench-"), seed=0)
    steps = []
    for running in (1, 256):
        for engine_process in (False, True):
            steps.append(step_times(model, engine_process, running, args.steps))
    print("\n| client | running | µs/step (LLMEngine.step, dummy runner) | get_stats round trip µs |\n"
          "|---|---:|---:|---:|")
    for r in steps:
        rtt = f"{r['get_stats_rtt_us']:.0f}" if r["get_stats_rtt_us"] is not None else "-"
        print(f"| {r['client']} | {r['running']} | {r['step_us']:.0f} | {rtt} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"cpu": cpu_name(), "cores": os.cpu_count(),
                                              "python": platform.python_version(), "serialisation": ser,
                                              "steps": steps}, indent=2))


if __name__ == "__main__":
    main()
