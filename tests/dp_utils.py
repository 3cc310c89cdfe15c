"""Helpers of the data-parallel tests: a logits hook that slows steps (so a replica can be killed mid-flight) and
process liveness checks."""

from __future__ import annotations

import time

SLOW_STEP_S = 0.05


def slow_steps(req_ids, logits):
    """A logits hook (pickled by reference into the replicas): steps holding a `slow-` request take 50 ms, so they
    are still running when a replica is killed. It leaves the logits alone."""
    if any(r.startswith("slow-") for r in req_ids):
        time.sleep(SLOW_STEP_S)
    return None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]
