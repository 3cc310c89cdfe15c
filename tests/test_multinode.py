"""Multi-node engines on one machine (both "nodes" on 127.0.0.1), tensor_parallel_size=2 split 1 + 1:

- torch.distributed rendezvous, vLLM's shape: node 1 is a separate `weavelm generate --headless --nnodes 2
  --node-rank 1 --master-addr --master-port` process tree; node 0 is `LLM(..., nnodes=2, node_rank=0, ...)`. Greedy
  tokens equal transformers'; killing node 1 mid-generation is an EngineDeadError naming its rank and node within
  10 s, and its worker does not survive.
- Ray: a head (`ray start --head --num-cpus 1`) and a second node (`ray start --address`), each with one CPU, so a
  tp=2 placement group (STRICT_SPREAD) must span both; greedy tokens equal transformers'. Killing the rank on the
  second node is an EngineDeadError naming it within 10 s. The cluster's processes are ended afterwards by their
  ids (the process trees of this cluster's session directory): `ray stop` would end every Ray on the machine.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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
        assert "worker rank 1 on node 1" in str(error) and f"pid {pids[1]}" in str(error), error
        llm.shutdown()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), "a worker process survived"
    finally:
        if node1.poll() is None:
            os.killpg(node1.pid, signal.SIGKILL)
        node1.wait(10)


def test_cli_flags_set_the_rendezvous(model):
    import argparse

    from weavelm.cli import add_engine_args, engine_config_from_args

    p = argparse.ArgumentParser()
    add_engine_args(p)
    args = p.parse_args(["--model", model[0], "--device", "cpu", "--tensor-parallel-size", "2", "--nnodes", "2",
                         "--node-rank", "0", "--master-addr", "10.0.0.1", "--master-port", "29600"])
    options = engine_config_from_args(args).executor.options
    assert (options.nnodes, options.node_rank, options.master_addr, options.master_port) == (2, 0, "10.0.0.1", 29600)
    assert not args.headless


def test_a_node_other_than_0_without_headless_is_refused(model):
    from weavelm.errors import ConfigError

    with pytest.raises(ConfigError, match="--headless"):
        LLM(model=model[0], tensor_parallel_size=2, nnodes=2, node_rank=1, **ENGINE)


# -- Ray ---------------------------------------------------------------------------------------------------------
def _descendants(marker: str) -> list[int]:
    """Processes whose command line names `marker`, and their descendants (never this process)."""
    parents: dict[int, int] = {}
    roots = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    roots.add(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    found, grew = set(roots), True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return sorted(found)


def _end_processes(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)


@pytest.fixture(scope="module")
def ray_cluster():
    """Two local Ray nodes of one CPU each (head + `ray start --address`); yields the head's address."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'weavelm[ray]')")
    if shutil.which("ray") is None:
        pytest.skip("the `ray` command is not on PATH")
    gc.collect()  # another module's engines release their actors in the Ray session they were made in
    if ray.is_initialized():
        ray.shutdown()  # this process's own local Ray (another module's): the engine must join the test cluster
    saved_address = os.environ.pop("RAY_ADDRESS", None)  # a local ray.init() leaves its address here
    temp = tempfile.mkdtemp(prefix="wlray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    port = _free_port()
    env = {**_env(), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # the driver (this process) speaks to the cluster as it was started
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    try:
        for cmd in (["ray", "start", "--head", "--port", str(port), "--temp-dir", temp, "--include-dashboard",
                     "false", *common],
                    ["ray", "start", "--address", f"127.0.0.1:{port}", *common]):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
            if done.returncode:
                pytest.skip(f"Ray could not start here: {' '.join(cmd[:3])}: {done.stderr[-800:]}")
        yield f"127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _end_processes(_descendants(temp))
        shutil.rmtree(temp, ignore_errors=True)
        if saved_address is not None:
            os.environ["RAY_ADDRESS"] = saved_address
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


RAY_DRIVER = """
import json, os, signal, sys, time
import ray
from tests.test_multinode import ENGINE, GREEDY, _tokens
from weavelm import LLM
from weavelm.errors import EngineDeadError

path, address = sys.argv[1], sys.argv[2]
executor = {"name": "ray", "tensor_parallel_size": 2, "address": address, "placement_strategy": "STRICT_SPREAD"}
llm = LLM(model=path, executor=executor, **ENGINE)
report = {}
try:
    report["tokens"] = _tokens(llm)
    report["nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    table = ray.util.placement_group_table(llm.engine.client.core.executor.placement)
    report["placed"] = sorted(table["bundles_to_node_id"].values())
    where = llm.engine.client.core.executor.locations
    report["pid"] = where[1][1]
    os.kill(where[1][1], signal.SIGKILL)  # rank 1, on the second node
    started = time.monotonic()
    try:
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], GREEDY)
        report["error"] = None
    except EngineDeadError as e:
        report["error"] = str(e)
    report["seconds"] = time.monotonic() - started
finally:
    llm.shutdown()
print("REPORT " + json.dumps(report))
"""


def test_ray_tp2_across_two_nodes(model, ray_cluster):
    """tp=2 over two Ray nodes (one rank each, STRICT_SPREAD) gives transformers' tokens, and killing the rank on the
    second node is an EngineDeadError naming it within 10 s. The driver is its own process, as a user's is (a Ray
    session this pytest process started earlier for another module would otherwise be reused)."""
    path, want = model
    done = subprocess.run([sys.executable, "-c", RAY_DRIVER, path, ray_cluster], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**_env(), "RAY_AUTH_MODE": "disabled"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])
    assert report["tokens"] == want
    assert len(report["nodes"]) == 2 and sorted(set(report["placed"])) == report["nodes"]  # one rank on each node
    assert report["error"] is not None and re.search(f"Ray worker rank 1 .*pid {report['pid']}", report["error"]), \
        report["error"]
    assert report["seconds"] < 10
