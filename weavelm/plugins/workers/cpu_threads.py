"""How many torch threads a CPU model runner uses."""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("weavelm.runner")


def choose_cpu_threads(requested: int | None) -> int:
    """`requested` when given; else one per core that is free now: the cores minus the 1-minute load average
    (at least 1, at most torch's default). OpenMP threads wait for each other at every op, so on cores other
    processes keep busy a second thread costs far more than it gives: measured on this 2-core machine at load ~7,
    the default model decoded at 0.6-1.5 tok/s with 2 threads and ~24 tok/s with 1."""
    if requested is not None:
        return requested
    cores = torch.get_num_threads()
    try:
        busy = os.getloadavg()[0]
    except OSError:
        return cores
    threads = max(1, min(cores, int(cores - busy + 0.5)))
    if threads < cores:
        logger.info("cpu_threads: %d of %d (1-minute load average %.1f); set num_threads to override",
                    threads, cores, busy)
    return threads
