"""The data-parallel clients (vLLM's DPLBAsyncMPClient idea): `data_parallel_size: N` runs N engine-core replicas,
each in its own process (core/dp_engine.py) with its own executor and devices, behind one client. `DPClient`
serves blocking callers (`LLMEngine`), `AsyncDPClient` asyncio (`AsyncLLM`); `make_client` picks them whenever
`data_parallel_size > 1` (with or without `engine_process`).

- Balance: a new request goes to the live replica with the lowest score `unfinished + 3 * waiting + 2 * kv_usage`
  (a waiting request weighs 4x a running one, as in vLLM's balancer). `unfinished` is what the client has sent and
  not seen finish (exact, instant); `waiting` and `kv_usage` come from the replica's LOAD report after each step
  (requests sent since count as waiting).
- Prefix-cache affinity: a prompt whose first KV block was routed before goes to the same replica again unless that
  replica's score exceeds the best by more than `AFFINITY_SLACK`.
- Stickiness: a request stays with its replica; aborts go there.
- Stats: `get_stats()` combines the replicas' (`dp_stats.aggregate`), with one `ReplicaStats` row each.
- Failure: a replica whose process dies (or freezes past `engine_iteration_timeout_s` while it holds requests) is
  noticed within `POLL_MS` by whoever waits on outputs. Its in-flight requests finish with an error output naming
  it (`AsyncLLM` raises `ReplicaDeadError` in their streams); the other replicas keep serving and new requests go to
  them only. When no replica is left, every call raises EngineDeadError, as for one core.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import socket
import time
from collections import OrderedDict, deque
from typing import Any

from weavelm.core import serial
from weavelm.core.client import EngineCoreClient
from weavelm.core.config import EngineConfig
from weavelm.core.core_process import POLL_MS, CoreProcess, dead_error, stop_process
from weavelm.core.dp_engine import ReplicaLoad, ReplicaSpec, replica_specs, run_replica
from weavelm.core.dp_layout import shares_experts
from weavelm.core.dp_stats import DataParallelStats, ReplicaStats, aggregate
from weavelm.core.outputs import EngineCoreOutput, SchedulerStats
from weavelm.core.registry import Registry
from weavelm.core.request import Request
from weavelm.errors import ConfigError, EngineDeadError, EngineError, ReplicaDeadError

WAITING_WEIGHT = 4  # a waiting request counts this many running ones (vLLM's DP balancer)
KV_WEIGHT = 2.0  # a full KV pool counts as this many running requests
AFFINITY_SLACK = 2.0  # how much busier the replica holding a prompt's first block may be and still get it
MAX_AFFINITY_ENTRIES = 4096


class Replica:
    """One replica as the client sees it: its process, the requests it holds, its last reported load."""

    def __init__(self, index: int, core: CoreProcess):
        self.index = index
        self.core = core
        self.unfinished: set[str] = set()  # sent (or queued), final output not yet read
        self.adds: list[tuple] = []  # queued for the next ADD message
        self.load = ReplicaLoad()
        self.num_requests = 0  # routed here since start
        self.dead: ReplicaDeadError | None = None

    @property
    def alive(self) -> bool:
        return self.dead is None

    def score(self) -> float:
        waiting = max(self.load.num_waiting, len(self.unfinished) - self.load.num_running)
        return len(self.unfinished) + (WAITING_WEIGHT - 1) * waiting + KV_WEIGHT * self.load.kv_usage

    def stats_row(self, stats: SchedulerStats | None) -> ReplicaStats:
        row = ReplicaStats(self.index, self.alive, self.core.pid, self.num_requests, self.load.num_preemptions)
        if stats is None:
            return row
        return ReplicaStats(self.index, self.alive, self.core.pid, self.num_requests, self.load.num_preemptions,
                            stats.num_running, stats.num_waiting, stats.num_used_blocks, stats.num_total_blocks,
                            stats.kv_usage, stats.prefix_hit_rate)


class _DPClient(EngineCoreClient):
    """What both clients share: the replicas, routing, sticky aborts, filing messages, losing a replica."""

    def __init__(self, config: EngineConfig, registry: Registry):
        self.block_size = config.cache.block_size
        self.lockstep = shares_experts(config)  # DP attention + EP MoE: one world, replicas step together
        cores: list[CoreProcess] = []
        try:
            for spec, replica_config in _replica_configs(config):
                cores.append(CoreProcess(replica_config, registry, entry=run_replica, entry_kwargs={"replica": spec},
                                         wait=False))
            for core in cores:  # the replicas load their models at the same time
                core.wait_ready()
        except BaseException:
            for core in cores:
                core.shutdown()
            raise
        self.replicas = [Replica(i, core) for i, core in enumerate(cores)]
        self.core_pid = cores[0].pid
        self.model_info: dict[str, Any] = cores[0].ready["model_info"]
        self.max_model_len: int = min(core.ready["max_model_len"] for core in cores)
        self.owner: dict[str, Replica] = {}  # unfinished request id -> its replica
        self.dead: EngineDeadError | None = None  # every replica is gone
        self._affinity: OrderedDict[int, int] = OrderedDict()  # hash of a first prompt block -> replica index
        self._call_ids = itertools.count()

    @property
    def replica_pids(self) -> list[int]:
        return [r.core.pid for r in self.replicas]

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]

    # -- routing ---------------------------------------------------------------------------------------------
    def _route(self, request: Request) -> Replica:
        live = self.live()
        if not live:
            raise self.dead or EngineDeadError("no data-parallel replica is alive")
        best = min(live, key=Replica.score)
        ids = request.prompt_token_ids
        key = hash(tuple(ids[:self.block_size])) if len(ids) >= self.block_size else None
        if key is not None:
            preferred = self._affinity.get(key)
            if preferred is not None and self.replicas[preferred].alive and \
                    self.replicas[preferred].score() <= best.score() + AFFINITY_SLACK:
                best = self.replicas[preferred]
            self._affinity[key] = best.index
            self._affinity.move_to_end(key)
            if len(self._affinity) > MAX_AFFINITY_ENTRIES:
                self._affinity.popitem(last=False)
        return best

    def _queue_add(self, request: Request) -> None:
        if self.dead is not None:
            raise self.dead
        replica = self._route(request)
        replica.unfinished.add(request.request_id)
        replica.adds.append(serial.request_to_wire(request))
        replica.num_requests += 1
        self.owner[request.request_id] = replica

    def _flush(self) -> None:
        sent = False
        for replica in self.replicas:
            if replica.adds and replica.alive:
                adds, replica.adds = replica.adds, []
                sent = self._send(replica, serial.ADD, adds) or sent
        if sent and self.lockstep:  # wake the others: a new wave starts on every replica at once
            for replica in self.live():
                self._send(replica, serial.ADD, [])

    def _send(self, replica: Replica, kind: int, payload: Any) -> bool:
        """Send to a replica; False (and the replica is lost) when it is dead."""
        try:
            replica.core.send(kind, payload)
            return True
        except EngineDeadError as e:
            self._lose(replica, e)
            return False

    def abort_requests(self, request_ids: list[str]) -> None:
        """Each abort goes to the replica holding the request; unknown, finished or lost ids are ignored."""
        by_replica: dict[int, list[str]] = {}
        for rid in request_ids:
            replica = self.owner.get(rid)
            if replica is not None:
                by_replica.setdefault(replica.index, []).append(rid)
        if by_replica:
            self._flush()
        for index, ids in by_replica.items():
            if self.replicas[index].alive:
                self._send(self.replicas[index], serial.ABORT, ids)

    # -- messages from the replicas --------------------------------------------------------------------------
    def _file(self, replica: Replica, kind: int, payload: Any) -> None:
        if kind == serial.OUTPUTS:
            for out in payload:
                if out.finished:
                    replica.unfinished.discard(out.request_id)
                    self.owner.pop(out.request_id, None)
            self._deliver(payload)
        elif kind == serial.UTILITY_RESULT:
            call_id, ok, value = payload
            self._settle(replica, call_id, ok, value)
        elif kind == serial.LOAD:
            replica.load = payload
        else:
            raise AssertionError(f"unexpected message kind {kind} from data-parallel replica {replica.index}")

    def _lose(self, replica: Replica, error: EngineDeadError) -> None:
        """The replica is dead: fail its requests (error outputs naming it) and its pending calls; the others go
        on. When it was the last one, the engine is dead."""
        if replica.dead is not None:
            return
        what = f"data-parallel replica {replica.index} is dead: {error}"
        dead = ReplicaDeadError(what if self.lockstep else f"{what}; its requests failed, the other replicas keep "
                                f"serving", replica.index, replica.core.pid, getattr(error, "exitcode", None))
        dead.__cause__ = error
        replica.dead = dead
        replica.core.shutdown()
        if self.lockstep:  # the others wait in collectives for it, and its experts are gone: the engine is lost
            self._stop_lockstep(replica, dead)
            dead = replica.dead
        lost, replica.adds = sorted(replica.unfinished), []
        replica.unfinished.clear()
        for rid in lost:
            self.owner.pop(rid, None)
            self._record_lost(rid, dead)
        self._fail_calls(replica, dead)
        if not self.live():
            self.dead = dead if self.lockstep else EngineDeadError(f"every data-parallel replica is dead (the last: "
                                                                   f"{dead})")
        if lost:
            text = f"{type(dead).__name__}: {dead}"
            self._deliver([EngineCoreOutput(rid, [], finish_reason="error", error=text) for rid in lost])
        if self.dead is not None:
            self._deliver_dead(self.dead)

    def _stop_lockstep(self, replica: Replica, dead: ReplicaDeadError) -> None:
        """Expert parallelism over the replicas: one dead replica ends them all (each waits in collectives for
        it). Every request fails with the error naming the replica that died first: one killed from outside if
        any (the others then fail in its collectives)."""
        live = self.live()
        for other in live:
            code = other.core.proc.exitcode if not other.core.proc.is_alive() else None
            if code is not None and code < 0:
                cause = dead_error(other.core.pid, code, None)
                dead = ReplicaDeadError(f"data-parallel replica {other.index} is dead: {cause}", other.index,
                                        other.core.pid, code)
                break
        cause = dead
        dead = ReplicaDeadError(f"{dead}; with expert parallelism the replicas share the experts, so every replica "
                                f"stopped", dead.replica, dead.pid, dead.exitcode)
        dead.__cause__ = cause
        replica.dead = dead
        for other in live:
            other.dead = dead
            stop_process(other.core.proc, 1.0)
            other.core.shutdown()
            replica.unfinished |= other.unfinished
            other.unfinished.clear()
            self._fail_calls(other, dead)

    def _record_lost(self, request_id: str, error: ReplicaDeadError) -> None:
        pass

    def _deliver(self, batch: list[EngineCoreOutput]) -> None:
        raise NotImplementedError

    def _deliver_dead(self, error: EngineDeadError) -> None:
        pass

    def _settle(self, replica: Replica, call_id: int, ok: bool, value: Any) -> None:
        raise NotImplementedError

    def _fail_calls(self, replica: Replica, error: ReplicaDeadError) -> None:
        raise NotImplementedError

    # -- utilities over every replica ------------------------------------------------------------------------
    def _combine(self, method: str, results: list[tuple[Replica, bool, Any] | None]) -> Any:
        """One answer from the replicas' (None: the replica died meanwhile): stats combined, collective_rpc
        results concatenated in replica order, anything else the first live replica's (they apply it alike)."""
        for entry in results:
            if entry is not None and not entry[1]:
                return _unwrap(method, entry[0], False, entry[2])
        if method == "get_stats":
            per = [e[2] if e is not None else None for e in results]
            rows = tuple(r.stats_row(s) for r, s in zip(self.replicas, per))
            return aggregate(per, rows)
        if method == "collective_rpc":
            return [x for e in results if e is not None for x in e[2]]
        for entry in results:
            if entry is not None:
                return entry[2]
        raise self.dead or EngineDeadError("no data-parallel replica answered")

    def check_health(self) -> None:
        """Raise EngineDeadError only when every replica is dead (one dead replica leaves the others serving)."""
        for replica in self.live():
            try:
                replica.core.check_alive()
                replica.core.check_liveness(waiting=False)
            except EngineDeadError as e:
                self._lose(replica, e)
        if self.dead is not None:
            raise self.dead

    def shutdown(self) -> None:
        for replica in self.replicas:
            replica.core.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_configs(config: EngineConfig) -> list[tuple[ReplicaSpec, EngineConfig]]:
    """Each replica's spec and config. With expert parallelism over the replicas: one world for their workers (a
    shared rendezvous), a gloo group for their engine cores, plain synchronous eager steps (the lockstep rounds
    count one launch per step), and one rank per replica (the in-process worker of `uniproc`)."""
    specs = replica_specs(config)
    if not shares_experts(config):
        return [(spec, config) for spec in specs]
    if config.executor.name != "uniproc":
        raise ConfigError([("executor.name", f"data_parallel_size > 1 with enable_expert_parallel runs one rank per "
                                             f"replica (the uniproc executor), not {config.executor.name}; leave "
                                             f"tensor_parallel_size and pipeline_parallel_size at 1")])
    master, lockstep = f"tcp://127.0.0.1:{free_port()}", free_port()
    return [(dataclasses.replace(spec, lockstep_port=lockstep),
             config.model_copy(update={"data_parallel_rank": spec.index, "data_parallel_master": master,
                                       "async_scheduling": False, "enforce_eager": True}))
            for spec in specs]


def _unwrap(method: str, replica: Replica, ok: bool, value: Any) -> Any:
    if ok:
        return value
    message, text, exc = value
    where = f"data-parallel replica {replica.index} (pid {replica.core.pid})"
    if exc is not None:
        exc.add_note(f"(raised in {where})\n{text}")
        raise exc
    raise EngineError(f"{method} failed in {where}: {message}\n{text}")


class DPClient(_DPClient):
    """For `LLMEngine` (one caller at a time): `get_output` waits on every replica at once."""

    def __init__(self, config: EngineConfig, registry: Registry):
        super().__init__(config, registry)
        import zmq

        self._zmq = zmq
        self._batches: deque[list[EngineCoreOutput]] = deque()
        self._results: dict[tuple[int, int], tuple[bool, Any]] = {}
        self._last_check = time.monotonic()

    def add_request(self, request: Request) -> None:
        self._queue_add(request)

    def get_output(self) -> list[EngineCoreOutput]:
        self._flush()
        while not self._batches:
            if self.dead is not None:
                raise self.dead
            if not any(r.unfinished for r in self.replicas):
                return []
            self._poll()
        return self._batches.popleft()

    def has_unfinished_requests(self) -> bool:
        return bool(self._batches) or any(r.unfinished for r in self.replicas)

    def get_stats(self) -> DataParallelStats:
        return self._call("get_stats", ())

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None,
                       ranks: list[int] | None = None) -> list[Any]:
        """Every replica's workers, results in replica then rank order."""
        return self._call("collective_rpc", (method, args, kwargs, ranks))

    def call_utility(self, method: str, *args: Any) -> Any:
        return self._call(method, args)

    def _call(self, method: str, args: tuple) -> Any:
        if self.dead is not None:
            raise self.dead
        self._flush()
        calls = []
        for replica in self.live():
            call_id = next(self._call_ids)
            if self._send(replica, serial.UTILITY, (call_id, method, args)):
                calls.append((replica, (replica.index, call_id)))
        while any(key not in self._results and replica.alive for replica, key in calls):
            self._poll()
        answers = {replica.index: self._results.pop(key) for replica, key in calls if key in self._results}
        results = [(r, *answers[r.index]) if r.index in answers else None for r in self.replicas]
        return self._combine(method, results)

    def _poll(self) -> None:
        """Read what every live replica sent within POLL_MS; check the replicas' liveness every POLL_MS."""
        zmq = self._zmq
        live = self.live()
        poller = zmq.Poller()
        for replica in live:
            poller.register(replica.core.output, zmq.POLLIN)
        ready = dict(poller.poll(POLL_MS))
        for replica in live:
            if not replica.alive or replica.core.output not in ready:  # (lost meanwhile: its sockets are closed)
                continue
            try:
                while True:
                    try:
                        data = replica.core.output.recv(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._file(replica, *replica.core.decode(data.buffer))
            except EngineDeadError as e:
                self._lose(replica, e)
        if time.monotonic() - self._last_check >= POLL_MS / 1000:
            self._last_check = time.monotonic()
            for replica in self.live():
                try:
                    replica.core.check_liveness(waiting=bool(replica.unfinished))
                except EngineDeadError as e:
                    self._lose(replica, e)

    def _deliver(self, batch: list[EngineCoreOutput]) -> None:
        self._batches.append(batch)

    def _settle(self, replica: Replica, call_id: int, ok: bool, value: Any) -> None:
        self._results[(replica.index, call_id)] = (ok, value)

    def _fail_calls(self, replica: Replica, error: ReplicaDeadError) -> None:
        pass  # `_call` stops waiting for a replica once it is dead: its answer is left out


class AsyncDPClient(_DPClient):
    """For `AsyncLLM`: one reader task per replica files its messages; outputs of every replica reach one queue.
    The streams of a dead replica's requests raise its `ReplicaDeadError` (see `request_error`)."""

    def __init__(self, config: EngineConfig, registry: Registry):
        super().__init__(config, registry)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._readers: list[asyncio.Task] = []
        self._waiters: dict[tuple[int, int], asyncio.Future] = {}
        self._lost: dict[str, ReplicaDeadError] = {}
        self._flush_scheduled = False

    async def add_request_async(self, request: Request) -> None:
        self._bind()
        self._queue_add(request)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_scheduled = False
        self._flush()

    async def get_output_async(self) -> list[EngineCoreOutput]:
        self._bind()
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)  # for every later caller too
            raise item
        return item

    def request_error(self, request_id: str) -> BaseException | None:
        """The ReplicaDeadError of a request lost with its replica (once; None for any other)."""
        return self._lost.pop(request_id, None)

    async def call_utility_async(self, method: str, *args: Any) -> Any:
        self._bind()
        if self.dead is not None:
            raise self.dead
        self._flush()
        calls = []
        for replica in self.live():
            call_id = next(self._call_ids)
            future = self._loop.create_future()
            self._waiters[(replica.index, call_id)] = future
            if self._send(replica, serial.UTILITY, (call_id, method, args)):
                calls.append((replica, call_id, future))
        try:
            answers = {}
            for replica, call_id, future in calls:
                try:
                    answers[replica.index] = await future
                except ReplicaDeadError:
                    pass  # died meanwhile: left out
        finally:
            for replica, call_id, _ in calls:
                self._waiters.pop((replica.index, call_id), None)
        return self._combine(method, [(r, *answers[r.index]) if r.index in answers else None
                                      for r in self.replicas])

    def _bind(self) -> None:
        """Read in the running loop: start the readers there unless they run already (the previous loop ended)."""
        loop = asyncio.get_running_loop()
        if loop is self._loop and self._readers and not all(t.done() for t in self._readers):
            return
        if self._loop is not None and self._loop is not loop and self._loop.is_running():
            raise EngineError("this engine is driven from another running event loop; use one loop per engine")
        if self.dead is not None:
            raise self.dead
        queue: asyncio.Queue = asyncio.Queue()
        while self._queue is not None and not self._queue.empty():
            queue.put_nowait(self._queue.get_nowait())  # batches the previous loop never took
        self._loop, self._queue, self._flush_scheduled = loop, queue, False
        self._readers = [loop.create_task(self._read(r), name=f"weavelm-dp-reader-{r.index}") for r in self.live()]

    async def _read(self, replica: Replica) -> None:
        import zmq
        import zmq.asyncio

        core = replica.core
        socket = zmq.asyncio.Socket.shadow(core.output.underlying)
        try:
            while replica.alive:
                if not await socket.poll(POLL_MS, zmq.POLLIN):
                    if replica.alive:
                        waiting = bool(replica.unfinished) or any(k[0] == replica.index for k in self._waiters)
                        core.check_liveness(waiting=waiting)
                    continue
                while replica.alive:
                    try:
                        data = core.output.recv(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._file(replica, *core.decode(data.buffer))
        except EngineDeadError as e:
            self._lose(replica, e)
        except zmq.ZMQError:
            if replica.alive:  # its sockets close only once it is lost (or at shutdown)
                raise

    def _deliver(self, batch: list[EngineCoreOutput]) -> None:
        if self._queue is not None:
            self._queue.put_nowait(batch)

    def _deliver_dead(self, error: EngineDeadError) -> None:
        if self._queue is not None:
            self._queue.put_nowait(error)

    def _record_lost(self, request_id: str, error: ReplicaDeadError) -> None:
        self._lost[request_id] = error

    def _settle(self, replica: Replica, call_id: int, ok: bool, value: Any) -> None:
        future = self._waiters.get((replica.index, call_id))
        if future is not None and not future.done():
            future.set_result((ok, value))

    def _fail_calls(self, replica: Replica, error: ReplicaDeadError) -> None:
        for (index, _), future in self._waiters.items():
            if index == replica.index and not future.done():
                future.set_exception(error)

    def shutdown(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            for reader in self._readers:
                if not reader.done():
                    try:
                        loop.call_soon_threadsafe(reader.cancel)
                    except RuntimeError:
                        pass
        super().shutdown()
