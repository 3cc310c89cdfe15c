"""`engine_process: true`: the engine core in its own process behind MPClient gives the same outputs as in-process,
aborts and stats cross the boundary, and a core that dies (killed, or of an exception) is a typed EngineDeadError
within seconds with no process left behind. Each engine process costs seconds to start, so one serves the parity
tests and then dies of an injected exception in the last test of this file (its scheduler is `fcfs` plus a fault on
a poisoned prompt, tests/engine_process_plugins.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from weavelm import LLM, LoRARequest, SamplingParams
from weavelm.core import serial
from weavelm.core.outputs import EngineCoreOutput, Logprob
from weavelm.core.registry import Registry
from weavelm.core.request import Request
from weavelm.errors import EngineDeadError, EngineError
from tests.engine_process_plugins import POISON

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
# chunked prefill off with a 32-token budget, so the core itself rejects a longer prompt
ENGINE = dict(dtype="float32", device="cpu", loader="safetensors", num_threads=1, cache={"num_blocks": 64, "block_size": 4},
              scheduler={"name": "fcfs", "max_num_batched_tokens": 32, "enable_chunked_prefill": False})
PROMPTS = [[5, 6, 7, 8], [21, 22], list(range(40, 70)), [3]]


def child_alive(pid: int) -> bool:
    try:
        import psutil
    except ImportError:
        return os.path.exists(f"/proc/{pid}")
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def core_pid(llm: LLM) -> int:
    return llm.engine.client.core_pid


@pytest.fixture(scope="module")
def inproc(tiny_llama):
    return LLM(model=tiny_llama, **ENGINE)


@pytest.fixture(scope="module")
def mp(tiny_llama):
    registry = Registry.load()
    registry.register_module("tests.engine_process_plugins")  # the spec carries it into the core process
    with LLM(model=tiny_llama, engine_process=True, registry=registry,
             **{**ENGINE, "scheduler": {**ENGINE["scheduler"], "name": "exploding"}}) as llm:
        pid = core_pid(llm)
        assert child_alive(pid)
        yield llm
    assert not child_alive(pid), "the context manager left the engine-core process running"


def run(llm, prompts, params):
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason, o.error)
            for o in llm.generate(prompts, params)]


def test_serializer_round_trips_every_field():
    params = SamplingParams(max_tokens=9, temperature=0.5, top_p=0.9, top_k=4, seed=-3, stop=["x"], priority=2,
                            logprobs=2, logit_bias={7: 1.5}, bad_words=["ab"], n=2, min_tokens=1)
    request = Request("r1", [1, 2, 3], params, eos_token_id=2, arrival_time=12.5)
    output = EngineCoreOutput("r1", [4, 5], [{4: Logprob(-0.1, 1, "a")}, {5: Logprob(-2.0, 3, None)}], "stop",
                              "x", 2, "boom", [None, {2: Logprob(-1.0, 1)}])
    for ser in (serial.MsgpackSerializer(),):
        kind, rows = ser.decode(ser.encode(serial.ADD, [serial.request_to_wire(request)]))
        back = serial.request_from_wire(rows[0])
        assert kind == serial.ADD and back.sampling_params == params and back.prompt_token_ids == [1, 2, 3]
        assert (back.request_id, back.eos_token_id, back.arrival_time) == ("r1", 2, 12.5)
        for lora in (LoRARequest("sql", 3, "/adapters/sql"), "sql", None):
            request.lora_request = lora
            _, rows = ser.decode(ser.encode(serial.ADD, [serial.request_to_wire(request)]))
            assert serial.request_from_wire(rows[0]).lora_request == lora
        kind, outs = ser.decode(ser.encode(serial.OUTPUTS, [output]))
        assert outs == [output] and outs[0].new_logprobs[1][5].rank == 3


def test_mixed_batch_greedy_and_seeded_sampling_match_in_process(inproc, mp):
    seeded = SamplingParams(max_tokens=6, temperature=0.9, top_k=50, seed=1234, ignore_eos=True)
    mixed = [GREEDY, seeded, GREEDY, SamplingParams(max_tokens=3, temperature=0.7, seed=7)]
    for params in (GREEDY, seeded, mixed):
        assert run(mp, PROMPTS, params) == run(inproc, PROMPTS, params)


def test_streaming_matches_in_process(inproc, mp):
    def stream(llm):
        return [(o.outputs[0].token_ids, o.finished) for o in llm.stream([5, 6, 7], GREEDY)]
    assert stream(mp) == stream(inproc)


def test_rejected_requests_are_error_outputs(inproc, mp):
    too_long = list(range(1, 41))  # above the 32-token budget with chunked prefill off: the core rejects it
    got, want = run(mp, [too_long, [5, 6]], GREEDY), run(inproc, [too_long, [5, 6]], GREEDY)
    assert got == want and "chunked prefill is off" in got[0][3] and got[0][2] == "error"
    rid = mp.engine.add_request(too_long, GREEDY)  # in-process this raises; across processes it is an output
    outs = []
    while mp.engine.has_unfinished_requests():
        outs += mp.engine.step()
    assert [(o.request_id, o.outputs[0].finish_reason) for o in outs] == [(rid, "error")]
    assert "chunked prefill is off" in outs[0].error


def test_abort_and_stats_cross_the_boundary(mp):
    stream = mp.stream([5, 6, 7], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
    next(stream)
    stream.close()  # aborts the request
    rid = mp.engine.add_request([8, 9], SamplingParams(max_tokens=200, ignore_eos=True))
    mp.engine.step()
    mp.abort(rid)
    outs = []
    while mp.engine.has_unfinished_requests():
        outs += mp.engine.step()
    assert outs[-1].request_id == rid and outs[-1].outputs[0].finish_reason == "abort"
    stats = mp.get_stats()
    assert (stats.num_running_reqs, stats.num_waiting_reqs, stats.num_used_blocks) == (0, 0, 0)
    assert stats.num_total_blocks == 64
    assert mp.engine.client.model_info["architecture"]


def test_core_killed_mid_stream_is_engine_dead_error(tiny_llama):
    llm = LLM(model=tiny_llama, engine_process=True, **ENGINE)
    pid = core_pid(llm)
    stream = llm.stream([5, 6, 7], SamplingParams(max_tokens=240, temperature=0.0, ignore_eos=True))
    next(stream)
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(EngineDeadError) as info:
        for _ in stream:
            pass
    assert time.monotonic() - t0 < 10
    assert f"pid {pid}" in str(info.value) and "SIGKILL" in str(info.value) and "engine core" in str(info.value)
    with pytest.raises(EngineDeadError):
        llm.generate([[1, 2]], GREEDY)
    with pytest.raises(EngineDeadError):
        llm.get_stats()
    llm.shutdown()
    llm.shutdown()  # idempotent
    assert not child_alive(pid)


CTRL_C_SCRIPT = textwrap.dedent("""
    import sys
    from weavelm import LLM, SamplingParams

    if __name__ == "__main__":
        llm = LLM(model=sys.argv[1], engine_process=True, dtype="float32", device="cpu", loader="safetensors",
                  cache={"num_blocks": 64, "block_size": 4})
        print(llm.engine.client.core_pid, flush=True)
        while True:
            llm.generate([[5, 6, 7]] * 4, SamplingParams(max_tokens=50, ignore_eos=True))
""")


def test_ctrl_c_in_the_caller_stops_everything(tiny_llama, tmp_path):
    script = tmp_path / "generate_loop.py"
    script.write_text(CTRL_C_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # SIGINT back to its default in the child: a test run started as a background job inherits it ignored, and a
    # Python started with SIGINT ignored never raises KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, str(script), tiny_llama], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=root,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stdout.readline()
        assert line.strip().isdigit(), proc.stderr.read()
        pid = int(line)
        time.sleep(0.5)  # inside the generate loop
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
        assert "KeyboardInterrupt" in proc.stderr.read()
        deadline = time.monotonic() + 5
        while child_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not child_alive(pid), "the engine-core process outlived its Ctrl-C'd parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_exception_in_the_core_loop_is_engine_dead_error_with_traceback(mp):
    """Runs last: it kills the shared engine process."""
    pid = core_pid(mp)
    assert run(mp, [[5, 6]], GREEDY)[0][3] is None
    t0 = time.monotonic()
    with pytest.raises(EngineDeadError) as info:
        mp.generate([[POISON, 1, 2]], GREEDY)
    assert time.monotonic() - t0 < 10
    text = str(info.value)
    assert f"pid {pid}" in text and "exited with code 1" in text
    assert "SchedulerExploded: poisoned prompt" in text and "Traceback" in text and "in schedule" in text
    assert isinstance(info.value, EngineError)
    with pytest.raises(EngineDeadError):
        mp.generate([[1, 2]], GREEDY)
    assert not child_alive(pid)
