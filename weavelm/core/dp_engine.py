"""A data-parallel replica's side: `data_parallel_size: N` runs N engine cores, each in its own process with its own
executor and devices, behind one `DPClient` (core/dp_client.py).

A replica is an ordinary engine-core process (`run_engine_core`) with two differences: before anything touches a
device it narrows `CUDA_VISIBLE_DEVICES` to its own slice of the devices (replica `i` of `N`, `R` ranks each, gets
devices `[i*R, (i+1)*R)` of those the frontend sees; on the CPU nothing changes), and its loop (`ReplicaCoreProc`)
reports its load (`ReplicaLoad`: waiting and running requests, KV usage, preemptions so far) after every step that
changed it, so the client can balance new requests without asking.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from weavelm.core import serial
from weavelm.core.config import EngineConfig
from weavelm.core.engine_proc import EngineCoreProc, run_engine_core
from weavelm.core.registry import RegistrySpec
from weavelm.errors import ConfigError


@dataclass(frozen=True)
class ReplicaSpec:
    """Replica `index` of `size`, and the environment variables its process sets before building the engine."""

    index: int
    size: int
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ReplicaLoad:
    """What a replica reports after a step (serial.LOAD): its queues, KV usage and preemptions since start."""

    num_waiting: int = 0
    num_running: int = 0
    kv_usage: float = 0.0
    num_preemptions: int = 0


def ranks_per_replica(config: EngineConfig) -> int:
    """The worker ranks (devices) one replica's executor uses: tensor x pipeline parallel size."""
    options = config.executor.options
    return (getattr(options, "tensor_parallel_size", 1) or 1) * (getattr(options, "pipeline_parallel_size", 1) or 1)


def replica_specs(config: EngineConfig) -> list[ReplicaSpec]:
    """One spec per replica. On CUDA each gets its own `ranks_per_replica` devices; ConfigError when there are not
    enough for every replica."""
    size = config.data_parallel_size
    devices = _visible_cuda_devices(config)
    if devices is None:
        return [ReplicaSpec(i, size) for i in range(size)]
    per = ranks_per_replica(config)
    if len(devices) < size * per:
        raise ConfigError([("data_parallel_size", f"{size} replicas of {per} device(s) each need {size * per} GPUs, "
                                                  f"but {len(devices)} are visible; lower data_parallel_size or the "
                                                  f"tensor/pipeline-parallel size")])
    return [ReplicaSpec(i, size, {"CUDA_VISIBLE_DEVICES": ",".join(devices[i * per:(i + 1) * per])})
            for i in range(size)]


def _visible_cuda_devices(config: EngineConfig) -> list[str] | None:
    """The CUDA devices this process sees (their ids as CUDA_VISIBLE_DEVICES names them), None on the CPU."""
    if config.device == "cpu":
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [d.strip() for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def run_replica(config: EngineConfig, registry_spec: RegistrySpec, input_addr: str, output_addr: str,
                parent_pid: int, *, replica: ReplicaSpec) -> None:
    """Process entry point of replica `replica.index`: its devices, then `run_engine_core` with a loop that
    reports its load."""
    os.environ.update(replica.env)
    run_engine_core(config, registry_spec, input_addr, output_addr, parent_pid,
                    proc_factory=partial(ReplicaCoreProc, replica=replica))


class ReplicaCoreProc(EngineCoreProc):
    """`EngineCoreProc` that sends a LOAD message after every step whose load differs from the last one sent."""

    def __init__(self, *args: Any, replica: ReplicaSpec, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.replica = replica
        self._last_load = ReplicaLoad()

    def run(self) -> None:
        while not self.stopping:
            self._handle_inputs(block=not self.core.has_unfinished_requests())
            if not self.stopping:
                self._send_outputs(self.core.step_fn())
                self.report_load()

    def report_load(self) -> None:
        stats = self.core.last_stats
        load = ReplicaLoad(stats.num_waiting, stats.num_running, stats.kv_usage,
                           getattr(self.core.scheduler, "num_preemptions", 0))
        if load != self._last_load:
            self._last_load = load
            self.send(serial.LOAD, load)
