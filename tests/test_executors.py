"""The multiproc and Ray executors: tensor-parallel parity over gloo on the CPU, identical output to uniproc, and
failure handling (a killed worker rank is a typed EngineDeadError within seconds, and no child survives)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from weavelm import LLM, SamplingParams
from weavelm.errors import EngineDeadError

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=6, temperature=0.8, top_p=0.95, seed=11, ignore_eos=True)
PROMPTS = [[1, 17, 300, 42, 5, 99, 250, 7], [31, 400, 8], [77, 123, 6, 19, 2]]


def engine(path: str, executor: dict | str = "uniproc", **overrides) -> LLM:
    return LLM(model=path, dtype="float32", device="cpu", loader="safetensors", attention="torch_ref",
               executor=executor, cache={"num_blocks": 128, "block_size": 4}, **overrides)


def tokens(llm: LLM, params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def tp_models(tmp_path_factory):
    """Tiny checkpoints for TP: the llama/qwen2/qwen3 fixtures plus an MQA llama (one KV head) and a llama with tied
    embeddings; head counts divisible by 2."""
    from tests.model_fixtures import build_tiny_model

    root = tmp_path_factory.mktemp("tp_models")
    models = {arch: build_tiny_model(arch, str(root / arch), seed=i) for i, arch in enumerate(("llama", "qwen2",
                                                                                              "qwen3"))}
    models["mqa"] = build_tiny_model("llama", str(root / "mqa"), seed=5, num_key_value_heads=1)
    models["tied"] = build_tiny_model("llama", str(root / "tied"), seed=6, tie_word_embeddings=True)
    return models


@pytest.mark.parametrize("arch", ["qwen2", "mqa", "tied"])  # Llama and Qwen3: the model contract's TP=2 tests
def test_tp2_over_gloo_matches_tp1(tp_models, arch):
    path = tp_models[arch]
    tp1 = engine(path)
    want_greedy, want_seeded = tokens(tp1, GREEDY), tokens(tp1, SEEDED)
    with engine(path, {"name": "multiproc", "tensor_parallel_size": 2}) as tp2:
        assert tokens(tp2, GREEDY) == want_greedy
        assert tokens(tp2, SEEDED) == want_seeded
        infos = tp2.collective_rpc("model_info")
        assert len(infos) == 2


def test_multiproc_tp1_matches_uniproc(tiny_llama):
    tp1 = engine(tiny_llama)
    want = tokens(tp1, GREEDY), tokens(tp1, SEEDED)
    with engine(tiny_llama, "multiproc") as llm:
        assert (tokens(llm, GREEDY), tokens(llm, SEEDED)) == want
        assert llm.collective_rpc("pid")[0] != os.getpid()


def test_ray_tp2_matches_tp1(tp_models):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'weavelm[ray]')")
    started = not ray.is_initialized()
    try:
        if started:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as e:  # noqa: BLE001 - any failure to start Ray is a skip with its reason
        print(f"Ray could not start: {e}")
        pytest.skip(f"Ray could not start here: {e}")
    path = tp_models["llama"]
    want = tokens(engine(path), GREEDY)
    llm = engine(path, {"name": "ray", "tensor_parallel_size": 2, "num_cpus_per_worker": 1})
    try:
        assert tokens(llm, GREEDY) == want
    finally:
        llm.shutdown()
        del llm
        if started:
            ray.shutdown()  # the local instance this test started (later modules start their own clusters)


def test_killed_worker_rank_is_a_typed_error_within_seconds(tiny_llama):
    llm = engine(tiny_llama, {"name": "multiproc", "tensor_parallel_size": 2})
    pids = llm.collective_rpc("pid")
    caught: dict[str, BaseException] = {}

    def run() -> None:
        try:
            llm.generate([{"prompt_token_ids": [1, 2, 3]}] * 4, SamplingParams(max_tokens=200, ignore_eos=True))
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            caught["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(0.5)
    os.kill(pids[1], signal.SIGKILL)
    started = time.monotonic()
    thread.join(10)
    assert not thread.is_alive(), "generate() did not return within 10 s of the kill"
    assert time.monotonic() - started < 10
    error = caught.get("error")
    assert isinstance(error, EngineDeadError), error
    assert f"worker rank 1 (pid {pids[1]})" in str(error) and "signal 9" in str(error)
    with pytest.raises(EngineDeadError):
        llm.generate([{"prompt_token_ids": [1, 2]}], GREEDY)
    llm.shutdown()
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), "a worker process survived shutdown"


def test_shutdown_leaves_no_worker_process(tiny_llama):
    llm = engine(tiny_llama, {"name": "multiproc", "tensor_parallel_size": 2})
    pids = llm.collective_rpc("pid")
    assert all(alive(p) for p in pids)
    llm.shutdown()
    llm.shutdown()  # idempotent
    assert not any(alive(p) for p in pids)


def test_engine_process_with_multiproc_matches_in_process(tiny_llama):
    tp1 = engine(tiny_llama)
    want = tokens(tp1, GREEDY), tokens(tp1, SEEDED)
    with engine(tiny_llama, {"name": "multiproc", "tensor_parallel_size": 2}, engine_process=True) as llm:
        assert (tokens(llm, GREEDY), tokens(llm, SEEDED)) == want
        assert len(llm.collective_rpc("pid")) == 2
