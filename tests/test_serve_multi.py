"""`weavelm serve --api-server-count N`: flags checked before anything loads, and a core that dies takes the API
servers down with it (exit 1, naming the process, nothing left behind); an adapter the core refuses at startup
exits 2 with the reason. Serving itself (the openai client, 200
streams with disconnects, summed /metrics) and SIGTERM run in test_serve_api.py and test_serve_shutdown.py, whose
servers include a two-API-server layout."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.serve_utils import ENGINE_ARGS, ServerProcess
from weavelm.cli import main


def test_api_server_count_is_checked_before_the_model_loads(capsys, tmp_path):
    assert main(["serve", "--model", str(tmp_path / "missing"), "--api-server-count", "0"]) == 2
    assert "--api-server-count: must be >= 1 (got 0)" in capsys.readouterr().err


def test_several_api_servers_need_the_core_in_its_own_process(smol_tokenizer_model, capsys):
    code = main(["serve", "--model", smol_tokenizer_model, "--device", "cpu", "--api-server-count", "2",
                 "--set", "engine_process=false"])
    assert code == 2 and "--api-server-count" in capsys.readouterr().err


def test_a_dead_core_stops_every_api_server(smol_tokenizer_model):
    server = ServerProcess(smol_tokenizer_model, "--api-server-count", "2")
    try:
        children = psutil.Process(server.proc.pid).children(recursive=True)
        core_pid = int(re.search(r"engine core \(pid (\d+)\)", server.output()).group(1))
        assert core_pid in [c.pid for c in children]
        os.kill(core_pid, signal.SIGKILL)
        t0 = time.monotonic()
        code = server.proc.wait(60)
        assert code == 1 and time.monotonic() - t0 < 45
        assert "EngineCore" in server.output() and "shutting the server down" in server.output()
        _, alive = psutil.wait_procs(children, timeout=5)
        assert not [c for c in alive if c.status() != psutil.STATUS_ZOMBIE]
    finally:
        server.stop()


@pytest.mark.parametrize("bad", ["nope"])
def test_api_server_count_must_be_an_int(bad, capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--model", "x", "--api-server-count", bad])
    assert "--api-server-count" in capsys.readouterr().err


def test_a_broken_adapter_exits_2_with_several_api_servers(tiny_llama, tmp_path):
    """The core refuses the adapter at startup; every API server reports why and the supervisor exits 2."""
    proc = subprocess.run([sys.executable, "-m", "weavelm.cli", "serve", "--model", tiny_llama, *ENGINE_ARGS,
                           "--port", "0", "--api-server-count", "2", "--lora-modules", f"gone={tmp_path / 'gone'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "LoRA adapter 'gone'" in proc.stderr and "no such directory" in proc.stderr
