"""Helpers for the server tests: a real `weavelm serve` subprocess on 127.0.0.1 and an SSE reader."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx

ENGINE_ARGS = ["--dtype", "float32", "--device", "cpu", "--set", "loader=safetensors",
               "--set", "cache.num_blocks=1024"]
ENGINE_KWARGS = dict(dtype="float32", device="cpu", loader="safetensors", cache={"num_blocks": 1024})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m weavelm.cli serve` on a free port, its output in a temporary log; `stop()` ends it."""

    def __init__(self, model: str, *extra: str, startup_timeout: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="weavelm-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "weavelm.cli", "serve", "--model", model, *ENGINE_ARGS, "--port",
               str(self.port), "--num-threads", "1", "--log-level", "warning", *extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=dict(os.environ))
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weavelm serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weavelm serve did not start in {startup_timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


def sse_events(lines: list[str]) -> list[dict | str]:
    """The `data:` payloads of a server-sent-event body: dicts, and "[DONE]"."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return 0.0
