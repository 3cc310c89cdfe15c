"""A data-parallel replica's side: `data_parallel_size: N` runs N engine cores, each in its own process with its own
executor and devices, behind one `DPClient` (core/dp_client.py).

A replica is an ordinary engine-core process (`run_engine_core`) with two differences: before anything touches a
device it narrows `CUDA_VISIBLE_DEVICES` to its own slice of the devices (replica `i` of `N`, `R` ranks each, gets
devices `[i*R, (i+1)*R)` of those the frontend sees; on the CPU nothing changes), and its loop (`ReplicaCoreProc`)
reports its load (`ReplicaLoad`: waiting and running requests, KV usage, preemptions so far) after every step that
changed it, so the client can balance new requests without asking.

DP attention + EP MoE (`enable_expert_parallel` with several replicas, `LockstepCoreProc`): the replicas' workers
form one world (`dp_layout.replica_world`) and every MoE layer dispatches tokens over an expert-parallel group that
spans the replicas, so the replicas step in lockstep. Each round every replica contributes (wants to run a forward,
holds unfinished requests, is stopping) to an all-reduce over a gloo group of the engine-core processes, then runs
its step's forward, or, when it has none but another replica does, a dummy forward (`dummy_moe_forward`: every MoE
layer on zero tokens, which joins the same collectives; vLLM's execute_dummy_batch). While no replica holds a
request they all wait for input up to `IDLE_TICK_MS` between rounds (the client also wakes every replica whenever
it sends one a request), so a new wave starts together; a stop (SHUTDOWN, or the parent gone) ends every replica
after the same round.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from weavelm.core import serial
from weavelm.core.config import EngineConfig
from weavelm.core.engine_proc import EngineCoreProc, run_engine_core
from weavelm.core.outputs import RunnerFuture
from weavelm.core.registry import RegistrySpec
from weavelm.errors import ConfigError, EngineDeadError


@dataclass(frozen=True)
class ReplicaSpec:
    """Replica `index` of `size`, and the environment variables its process sets before building the engine."""

    index: int
    size: int
    env: dict[str, str] = field(default_factory=dict)
    lockstep_port: int | None = None  # DP attention + EP MoE: the engine cores' gloo group (replica 0 hosts it)


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
    proc_cls = ReplicaCoreProc if replica.lockstep_port is None else LockstepCoreProc
    run_engine_core(config, registry_spec, input_addr, output_addr, parent_pid,
                    proc_factory=partial(proc_cls, replica=replica))


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


IDLE_TICK_MS = 50  # lockstep replicas with no request anywhere meet this often
LOCKSTEP_TIMEOUT_S = 600.0  # a collective waiting this long for a replica fails (the client notices deaths sooner)


def dummy_moe_forward(model: Any) -> None:
    """Every MoE layer of `model` on zero tokens, in model order: the expert-parallel collectives of one forward,
    for a replica with nothing to run while another replica runs a step."""
    import torch

    from weavelm.layers.fused_moe import FusedMoE

    for module in model.modules():
        if isinstance(module, FusedMoE):
            weight = module.gate.weight
            module(torch.empty((0, weight.shape[1]), dtype=weight.dtype, device=weight.device))


class _Rounds:
    """The lockstep rounds of one replica: an all-reduce of (forward wanted, unfinished requests, stopping) over
    the engine cores' gloo group, and the dummy forward when another replica runs one."""

    def __init__(self, replica: ReplicaSpec, executor: Any):
        import torch
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=LOCKSTEP_TIMEOUT_S)
        store = dist.TCPStore("127.0.0.1", replica.lockstep_port, replica.size, is_master=replica.index == 0,
                              timeout=timeout)
        self.group = dist.ProcessGroupGloo(dist.PrefixStore("weavelm-dp-lockstep", store), replica.index,
                                           replica.size, timeout)
        self.store = store  # kept alive with the group
        self.executor = executor
        self.flags = torch.zeros(3, dtype=torch.int64)
        self.agreed = False  # this round's all-reduce is done
        self.any_forward = self.any_unfinished = self.stop = False

    def agree(self, forward: bool, unfinished: bool, stopping: bool) -> bool:
        """Meet the other replicas for this round; True when some replica runs a forward in it."""
        flags = self.flags
        flags[0], flags[1], flags[2] = int(forward), int(unfinished), int(stopping)
        self.group.allreduce([flags]).wait()
        self.agreed = True
        self.any_forward, self.any_unfinished = bool(flags[0]), bool(flags[1])
        self.stop = self.stop or bool(flags[2])
        return self.any_forward

    def dummy(self) -> None:
        self.executor.collective_rpc("apply_model", (dummy_moe_forward,))


class _LockstepExecutor:
    """The replica's executor as its `EngineCore` sees it: a step's launch first meets the other replicas (and runs
    a dummy forward when this step is empty but another replica's is not). Everything else is the executor's."""

    def __init__(self, executor: Any, rounds: _Rounds, proc: LockstepCoreProc):
        self._executor, self._rounds, self._proc = executor, rounds, proc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._executor, name)

    def execute_model_async(self, scheduler_output: Any) -> Any:
        with _fatal(self._proc.replica):
            self._meet(scheduler_output)
            return _FatalFuture(self._executor.execute_model_async(scheduler_output), self._proc.replica)

    def execute_model(self, scheduler_output: Any) -> Any:
        with _fatal(self._proc.replica):
            self._meet(scheduler_output)
            return self._executor.execute_model(scheduler_output)

    def _meet(self, scheduler_output: Any) -> None:
        if self._rounds.agreed:
            raise AssertionError("a lockstep replica launched two steps in one round")
        empty = scheduler_output.is_empty
        if self._rounds.agree(not empty, True, self._proc.stopping) and empty:
            self._rounds.dummy()


@contextlib.contextmanager
def _fatal(replica: ReplicaSpec) -> Iterator[None]:
    """A lockstep step that fails is never isolated to its requests (the engine core's rule for one replica): the
    other replicas wait in its collectives, or a peer is gone. EngineDeadError ends this replica's loop."""
    try:
        yield
    except EngineDeadError:
        raise
    except Exception as e:
        raise EngineDeadError(f"data-parallel replica {replica.index}: a lockstep step failed (a peer replica died, "
                              f"or its collectives broke): {type(e).__name__}: {e}") from e


class _FatalFuture(RunnerFuture):
    """A launched lockstep step whose failure, when collected, is fatal too (see `_fatal`)."""

    def __init__(self, future: RunnerFuture, replica: ReplicaSpec):
        super().__init__()
        self._future, self._replica = future, replica

    def result(self) -> Any:
        with _fatal(self._replica):
            return self._future.result()


class LockstepCoreProc(ReplicaCoreProc):
    """The loop of a replica whose MoE layers span the replicas (see the module's docstring): one round per
    iteration, plain (unpipelined) steps."""

    def __init__(self, *args: Any, replica: ReplicaSpec, **kwargs: Any):
        super().__init__(*args, replica=replica, **kwargs)
        core = self.core
        self.rounds = _Rounds(replica, core.executor)
        core.executor = _LockstepExecutor(core.executor, self.rounds, self)
        core.step_fn = core.step  # one launch per round

    def run(self) -> None:
        rounds = self.rounds
        idle = True
        while True:
            self._wait_inputs(IDLE_TICK_MS if idle else 0)
            rounds.agreed = False
            if not self.stopping and self.core.has_unfinished_requests():
                self._send_outputs(self.core.step_fn())
                self.report_load()
            if not rounds.agreed:  # no launch this round: meet anyway, and keep the others' forward company
                if rounds.agree(False, self.core.has_unfinished_requests(), self.stopping):
                    rounds.dummy()
            if rounds.stop:
                self.stopping = True
                return
            idle = not rounds.any_unfinished

    def _wait_inputs(self, timeout_ms: int) -> None:
        """Apply every queued message, first waiting up to `timeout_ms` for one."""
        if timeout_ms and not self.poller.poll(timeout_ms):
            if os.getppid() != self.parent_pid:
                self.stopping = True
            return
        self._handle_inputs(block=False)
