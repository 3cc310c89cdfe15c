"""Multi-node engines on one machine (both "nodes" on 127.0.0.1), tensor_parallel_size=2 split 1 + 1:

- torch.distributed rendezvous, vLLM's shape: node 1 is a separate `weavelm generate --headless --nnodes 2
  --node-rank 1 --master-addr --master-port` process tree; node 0 is `LLM(..., nnodes=2, node_rank=0, ...)`. Greedy
  tokens equal transformers'; killing node 1 mid-generation is an EngineDeadError naming its rank and node within
  10 s, and its worker does not survive.
- Ray: a head (`ray start --head --num-cpus 1`) and a second node (`ray start --address`), each with one CPU, so a
  tp=2 placement group (STRICT_SPREAD) must span both; greedy tokens equal transformers'. `ray stop` afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.model_fixtures import build_tiny_model, hf_greedy
from weavelm import LLM, SamplingParams
from weavelm.errors import EngineDeadError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE = dict(dtype="float32", device="cpu", attention="torch_ref")
PROMPTS = [[1, 17, 300, 42, 5, 99, 250, 7], [31, 400, 8], [77, 123, 6, 19, 2]]
MAX_TOKENS = 6
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _tokens(llm: LLM) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    for o in outs:
        assert o.error is None, o.error
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[str, list[list[int]]]:
    path = build_tiny_model("qwen3", str(tmp_path_factory.mktemp("multinode") / "qwen3"), seed=3)
    return path, [hf_greedy(path, p, MAX_TOKENS) for p in PROMPTS]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_two_nodes_over_torch_distributed(model):
    path, want = model
    port = _free_port()
    node1 = subprocess.Popen(
        [sys.executable, "-m", "weavelm.cli", "generate", "--headless", "--model", path, "--device", "cpu",
         "--dtype", "float32", "--tensor-parallel-size", "2", "--nnodes", "2", "--node-rank", "1",
         "--master-addr", "127.0.0.1", "--master-port", str(port)], env=_env(), start_new_session=True)
    try:
        llm = LLM(model=path, tensor_parallel_size=2, nnodes=2, node_rank=0, master_addr="127.0.0.1",
                  master_port=port, **ENGINE)
        assert _tokens(llm) == want
        pids = llm.collective_rpc("pid")
        assert pids[1] != node1.pid and _alive(pids[1])  # rank 1 is node 1's worker
        caught: dict[str, BaseException] = {}

        def run() -> None:
            try:
                llm.generate([{"prompt_token_ids": [1, 2, 3]}] * 4, SamplingParams(max_tokens=200, ignore_eos=True))
            except BaseException as e:  # noqa: BLE001 - the test inspects it
                caught["error"] = e

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        time.sleep(0.5)
        os.kill(node1.pid, signal.SIGKILL)  # node 1 goes away (its agent; its worker dies with it)
        started = time.monotonic()
        thread.join(10)
        assert not thread.is_alive(), "generate() did not return within 10 s of losing node 1"
        assert time.monotonic() - started < 10
        error = caught.get("error")
        assert isinstance(error, EngineDeadError), error
        assert f"worker rank 1 on node 1" in str(error) and f"pid {pids[1]}" in str(error), error
        llm.shutdown()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), "a worker process survived"
    finally:
        if node1.poll() is None:
            os.killpg(node1.pid, signal.SIGKILL)
        node1.wait(10)


def test_a_node_other_than_0_without_headless_is_refused(model):
    from weavelm.errors import ConfigError

    with pytest.raises(ConfigError, match="--headless"):
        LLM(model=model[0], tensor_parallel_size=2, nnodes=2, node_rank=1, **ENGINE)
