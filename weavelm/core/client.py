"""EngineCoreClient: how a frontend talks to the engine core (vLLM v1's shape). `make_client` picks one of four:

| core               | blocking callers (`LLMEngine`) | asyncio (`AsyncLLM`)                          |
|--------------------|--------------------------------|-----------------------------------------------|
| in this process    | `InprocClient`                 | `AsyncInprocClient` (owns the engine thread)  |
| its own process    | `SyncMPClient`                 | `AsyncMPClient` (one reader task)             |

vLLM drops in-process asyncio; weavelm keeps it as a small client that owns one thread stepping the core, because
on a CPU the core and the frontend then share one process's cores and a notebook or test starts it without a
spawn. Every client hands out the core's outputs in batches as `EngineCoreOutput`s; a request the core refuses
comes back as a finished output with `error` set (`InprocClient.add_request` raises it instead). The async clients
bind to the event loop that uses them; when that loop has ended, the next one takes over.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from abc import ABC
from collections import deque
from collections.abc import Callable
from typing import Any

from weavelm.core.config import EngineConfig
from weavelm.core.engine_core import EngineCore
from weavelm.core.outputs import EngineCoreOutput, SchedulerStats
from weavelm.core.registry import Registry
from weavelm.core.request import Request
from weavelm.errors import ConfigError, EngineDeadError, EngineError


class EngineCoreClient(ABC):
    """The verbs a frontend uses. Sync clients implement the plain verbs, async clients the `*_async` ones (and
    the non-blocking `abort_requests`); calling the other kind raises NotImplementedError."""

    max_model_len: int
    model_info: dict[str, Any]
    core_pid: int | None = None  # the engine-core process, None in process

    @staticmethod
    def make_client(config: EngineConfig, registry: Registry, *, multiprocess_mode: bool, asyncio_mode: bool,
                    attachment: Any = None, loader: Any = None) -> EngineCoreClient:
        """The client for a core in this process or its own (`attachment`: join one started elsewhere). `loader`:
        the frontend's, which an in-process core reuses (one loader per engine per process). With
        `data_parallel_size > 1` the replicas always run in their own processes (core/dp_client.py)."""
        if config.data_parallel_size > 1:
            from weavelm.core.dp_client import AsyncDPClient, DPClient

            if attachment is not None:
                raise ConfigError([("data_parallel_size", "a frontend attached to a shared engine core "
                                    "(--api-server-count > 1) cannot start data-parallel replicas; use "
                                    "--api-server-count 1 with data_parallel_size > 1")])
            return (AsyncDPClient if asyncio_mode else DPClient)(config, registry)
        if multiprocess_mode:
            from weavelm.core.mp_client import AsyncMPClient, SyncMPClient

            return (AsyncMPClient if asyncio_mode else SyncMPClient)(config, registry, attachment)
        return (AsyncInprocClient if asyncio_mode else InprocClient)(config, registry, loader)

    # -- blocking callers ----------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no blocking verbs; use add_request_async")

    def abort_requests(self, request_ids: list[str]) -> None:
        """Abort requests in the core; their final outputs (finish_reason "abort") come with later outputs."""
        raise NotImplementedError(type(self).__name__)

    def get_output(self) -> list[EngineCoreOutput]:
        """Run (or wait for) the core's next step and return its outputs; [] when nothing is unfinished."""
        raise NotImplementedError(f"{type(self).__name__} has no blocking verbs; use get_output_async")

    def has_unfinished_requests(self) -> bool:
        raise NotImplementedError(type(self).__name__)

    def get_stats(self) -> SchedulerStats:
        raise NotImplementedError(f"{type(self).__name__} has no blocking verbs; use call_utility_async")

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None,
                       ranks: list[int] | None = None) -> list[Any]:
        """Call a method on every worker (see `Executor.collective_rpc`) between steps."""
        raise NotImplementedError(f"{type(self).__name__} has no blocking verbs; use call_utility_async")

    def call_utility(self, method: str, *args: Any) -> Any:
        """A utility method of the core (`engine_proc.UTILITY_METHODS`), between steps."""
        raise NotImplementedError(f"{type(self).__name__} has no blocking verbs; use call_utility_async")

    # -- asyncio callers -----------------------------------------------------------------------------------
    async def add_request_async(self, request: Request) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no async verbs; use add_request")

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        self.abort_requests(request_ids)

    async def get_output_async(self) -> list[EngineCoreOutput]:
        """The next batch of outputs (waits for one); raises EngineDeadError once the core is dead."""
        raise NotImplementedError(f"{type(self).__name__} has no async verbs; use get_output")

    async def call_utility_async(self, method: str, *args: Any) -> Any:
        """`get_stats()` or `collective_rpc(...)` on the core, awaited."""
        raise NotImplementedError(f"{type(self).__name__} has no async verbs")

    def request_error(self, request_id: str) -> BaseException | None:
        """The typed error of a request the client failed on its own (a data-parallel replica died under it),
        handed out once; None for every other request."""
        return None

    def check_health(self) -> None:
        """Raise EngineDeadError when the core (its process or its thread) has died."""

    def shutdown(self) -> None:
        pass


class InprocClient(EngineCoreClient):
    """The core in this process, stepped by the caller of `get_output`."""

    def __init__(self, config: EngineConfig, registry: Registry, loader: Any = None):
        self.core = EngineCore(config, registry, loader)
        self.max_model_len = self.core.max_model_len
        self.model_info = self.core.model_info

    def add_request(self, request: Request) -> None:
        """Queue a request, or raise RequestError (nothing queued) when the scheduler can never run it."""
        self.core.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.core.abort_requests(request_ids)

    def get_output(self) -> list[EngineCoreOutput]:
        return self.core.step_fn()

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def get_stats(self) -> SchedulerStats:
        return self.core.get_stats()

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None,
                       ranks: list[int] | None = None) -> list[Any]:
        return self.core.collective_rpc(method, args, kwargs, ranks)

    def call_utility(self, method: str, *args: Any) -> Any:
        return getattr(self.core, method)(*args)

    def shutdown(self) -> None:
        self.core.shutdown()


class AsyncInprocClient(EngineCoreClient):
    """The core in this process, stepped by a thread this client owns. The event loop posts commands (adds,
    aborts, utility calls) that the thread applies between steps; the thread hands each step's outputs back
    through `call_soon_threadsafe`, so the loop never waits for a step."""

    def __init__(self, config: EngineConfig, registry: Registry, loader: Any = None):
        self.core = EngineCore(config, registry, loader)
        self.max_model_len = self.core.max_model_len
        self.model_info = self.core.model_info
        self._commands: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._outputs: deque[list[EngineCoreOutput]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None
        self._dead: EngineDeadError | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="weavelm-engine-loop", daemon=True)
        self._thread.start()

    async def add_request_async(self, request: Request) -> None:
        self._bind()
        self._post(lambda: self._add(request))

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            self._post(lambda: self.core.abort_requests(request_ids))

    async def get_output_async(self) -> list[EngineCoreOutput]:
        self._bind()
        while not self._outputs:
            self.check_health()
            self._ready.clear()
            await self._ready.wait()
        return self._outputs.popleft()

    async def call_utility_async(self, method: str, *args: Any) -> Any:
        self._bind()
        future: concurrent.futures.Future = concurrent.futures.Future()

        def call() -> None:
            try:
                future.set_result(getattr(self.core, method)(*args))
            except Exception as e:  # the caller gets it; the core goes on
                future.set_exception(e)

        call.on_dead = future.set_exception  # type: ignore[attr-defined]
        self._post(call)
        return await asyncio.wrap_future(future)

    def check_health(self) -> None:
        if self._dead is not None:
            raise self._dead

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(30)
        self.core.shutdown()

    def _bind(self) -> None:
        """Deliver outputs to the running loop from now on (the previous one has ended)."""
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        if self._loop is not None and self._loop.is_running():
            raise EngineError("this engine is driven from another running event loop; use one loop per engine")
        self._loop, self._ready = loop, asyncio.Event()

    def _post(self, command: Callable[[], None]) -> None:
        with self._lock:
            dead = self._dead
            if dead is None:
                self._commands.append(command)
                self._wake.set()
        if dead is not None:
            raise dead

    def _add(self, request: Request) -> None:
        try:
            self.core.add_request(request)
        except Exception as e:  # as from an engine-core process: the request's error output
            self._deliver([EngineCoreOutput(request.request_id, [], finish_reason="error", error=str(e))])

    def _deliver(self, outputs: list[EngineCoreOutput]) -> None:
        self._outputs.append(outputs)
        self._signal()

    def _signal(self) -> None:
        loop, ready = self._loop, self._ready
        if loop is not None:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # that loop is closed: the next one to bind reads what is waiting
                pass

    def _run(self) -> None:
        core = self.core
        try:
            while not self._stopping:
                with self._lock:
                    commands, self._commands = self._commands, []
                for command in commands:
                    command()
                if core.has_unfinished_requests():
                    outputs = core.step_fn()
                    if outputs:
                        self._deliver(outputs)
                else:
                    self._wake.wait()
                    self._wake.clear()
        except BaseException as e:  # the engine is broken: fail every caller, now and later
            dead = EngineDeadError(f"the engine loop died: {type(e).__name__}: {e}")
            dead.__cause__ = e
            with self._lock:
                self._dead = dead
                commands, self._commands = self._commands, []
            for command in commands:
                on_dead = getattr(command, "on_dead", None)
                if on_dead is not None:
                    on_dead(dead)
            self._signal()
