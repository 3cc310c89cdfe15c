"""EngineCore: assembles the engine from its config and registry and runs schedule -> execute -> update."""

from __future__ import annotations

import dataclasses
import gc
import logging
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any

from weavelm.core.assembly import Assembly, build_lora_manager
from weavelm.core.config import EngineConfig
from weavelm.core.contexts import SchedulerContext
from weavelm.core.outputs import EngineCoreOutput, ModelRunnerOutput, RunnerFuture, SchedulerOutput, SchedulerStats
from weavelm.core.registry import Registry
from weavelm.core.request import Request, RequestStatus
from weavelm.errors import EngineDeadError, EngineError, LoRAError, RequestError

logger = logging.getLogger("weavelm.engine")
MAX_IDLE_STEPS = 64
MAX_CONSECUTIVE_FAILURES = 8


@dataclass
class PendingStep:
    """A scheduled step whose device work was launched but not yet collected."""

    scheduler_output: SchedulerOutput
    future: RunnerFuture


class _FailedFuture(RunnerFuture):
    """A step whose launch raised: `result()` re-raises, so the failure is handled where steps are collected."""

    def __init__(self, error: BaseException):
        super().__init__()
        self.error = error

    def result(self) -> ModelRunnerOutput:
        raise self.error


class EngineCore:
    """The inner loop. Owns one executor and one scheduler, built by the assembler from one per-engine registry;
    everything else talks to it through a client.

    Failure rule: if launching, executing or folding in a step raises, every request scheduled in that step is
    finished with finish_reason "error" and the exception's text, its KV blocks are freed, and the engine goes on
    serving every other request. A failing step consumes the requests it held, so a cause that keeps failing is
    never retried forever; after `MAX_CONSECUTIVE_FAILURES` failing steps in a row the core raises EngineError
    (the executor itself is broken), and the next request still gets a fresh chance.
    """

    def __init__(self, config: EngineConfig, registry: Registry, loader: Any = None):
        self.config = config
        self.registry = registry
        self.assembly = Assembly(config, registry, loader)  # loader: the frontend's, when in this process
        self.executor = self.assembly.build_executor()
        self.model_info: dict[str, Any] = self.executor.model_info()
        self.num_blocks = self.executor.determine_num_blocks()
        self.executor.initialize_cache(self.num_blocks)
        block_size = config.cache.block_size
        max_len = int(self.model_info.get("max_model_len", 4096))
        if max_len > self.num_blocks * block_size:
            logger.warning("max_model_len %d exceeds the KV cache (%d blocks x %d tokens); capping it to %d",
                           max_len, self.num_blocks, block_size, self.num_blocks * block_size)
            max_len = self.num_blocks * block_size
        self.max_model_len = max_len
        self.lora = build_lora_manager(config, registry)
        if self.lora is not None:
            self.lora.set_targets(self.model_info["lora_targets"])
        # pipeline parallelism: one launched step per stage (vLLM's batch queue), so the stages work on different
        # micro-batches at once; the sampled tokens reach every stage through the next step's scheduler output
        self.max_concurrent_batches = self.executor.max_concurrent_batches
        self._stage_tokens: dict[str, list[int]] | None = {} if self.max_concurrent_batches > 1 else None
        self.async_scheduling = self._use_async_scheduling()
        self.scheduler = self.assembly.build_scheduler(SchedulerContext(
            num_blocks=self.num_blocks, block_size=block_size, max_model_len=max_len,
            # a pooling request's pooler (MEAN) needs every prompt position computed: no prefix-cache reads
            enable_prefix_caching=config.cache.enable_prefix_caching and config.runner != "pooling", lora=self.lora,
            async_scheduling=self.async_scheduling, sliding_window=self.model_info.get("sliding_window")))
        self.last_stats = SchedulerStats()
        # The step function is chosen once: a plain step on the CPU (launching a step runs its whole forward
        # there), else a pipelined one that keeps the next step launched while the caller handles this one's
        # outputs (two in flight with async scheduling)
        pipelined = self.async_scheduling or not str(self.model_info.get("device", "cpu")).startswith("cpu")
        self.step_fn = self.step_with_batch_queue if pipelined else self.step
        if self.max_concurrent_batches > 1:  # on every device, the CPU included
            self.step_fn = self.step_with_pipeline
        self.batch_queue: deque[PendingStep] = deque()  # launched steps, oldest first
        self._deferred: deque[list[EngineCoreOutput]] = deque()  # aborts' finals, steps collected by a utility
        self._num_inflight = 0
        self._idle_steps = 0
        self._consecutive_failures = 0
        if self.async_scheduling:
            # vLLM's habit: move the startup objects (model, registry, configs) out of the collector's reach, so a
            # full collection during serving does not pause the host for long enough to leave the device idle;
            # `shutdown` unfreezes, so a process that builds engine after engine can still collect the old ones
            gc.collect()
            gc.freeze()
        self.registry.hook.weavelm_engine_started(config=config)

    def _use_async_scheduling(self) -> bool:
        """`async_scheduling` as configured, else on for a device that runs asynchronously (CUDA); never with
        speculative decoding, nor for a scheduler class that does not declare support."""
        if self.max_concurrent_batches > 1:  # stages need each token before its next step: never placeholders
            if self.config.async_scheduling:
                logger.warning("async scheduling is off with pipeline parallelism (its batch queue overlaps steps)")
            return False
        if not self.assembly.scheduler_cls.supports_async_scheduling:
            if self.config.async_scheduling:
                logger.warning("scheduler %s does not support async scheduling; running synchronously",
                               self.config.scheduler.name)
            return False
        if self.config.async_scheduling is not None:
            return self.config.async_scheduling and self.config.speculative is None
        on_cuda = str(self.model_info.get("device", "cpu")).startswith("cuda")
        return on_cuda and self.config.speculative is None

    def add_request(self, request: Request) -> None:
        """Queue a request, or raise RequestError (nothing queued) when the scheduler can never run it."""
        if request.lora_request is not None and self.lora is None:
            raise LoRAError("lora_request: this engine serves no adapters; add a `lora:` section (e.g. "
                            "lora: {max_loras: 4, max_lora_rank: 16}) to the config")
        if self.lora is not None:
            if isinstance(request.lora_request, str):  # a configured adapter, by name
                request.lora_request = self.lora.lora_request(request.lora_request)
            self.lora.check_request(request.lora_request)
        reason = self.scheduler.check_request(request)
        if reason is not None:
            raise RequestError(reason)
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        """Finish requests as aborted and free their blocks; their final outputs come from the next `step_fn()`."""
        aborted = self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)
        if aborted:
            self._deferred.append(aborted)

    def has_unfinished_requests(self) -> bool:
        """Whether `step_fn()` has more to return: unfinished requests, launched steps or deferred outputs."""
        return bool(self._deferred or self.batch_queue) or self.scheduler.has_unfinished_requests()

    def get_stats(self) -> SchedulerStats:
        """The scheduler's current stats (running / waiting requests, KV blocks used and total, hit rate)."""
        return self.scheduler.get_stats()

    # -- LoRA adapters by name, at run time (vLLM's add_lora / remove_lora); utilities of every frontend -------
    def add_lora(self, lora_request: Any) -> bool:
        """Check the adapter of `lora_request` (LoRAError) and make it selectable by name; False when added
        already."""
        return self._lora_manager().add_lora(lora_request)

    def load_lora_adapter(self, lora_name: str, lora_path: str, replace: bool = False) -> Any:
        """Add the adapter at `lora_path` as `lora_name` under an id the core picks (`replace`: in place of the
        adapter of that name); returns its LoRARequest."""
        return self._lora_manager().load_lora(lora_name, lora_path, replace)

    def remove_lora(self, lora: int | str) -> bool:
        """Forget the adapter with this id or name (False: none has it); requests queued on it still finish."""
        return self._lora_manager().remove_lora(lora)

    def lora_adapters(self) -> dict[str, Any]:
        """{name: LoRARequest} of the adapters selectable by name ({} without `lora:`)."""
        return self.lora.named_loras() if self.lora is not None else {}

    def _lora_manager(self) -> Any:
        if self.lora is None:
            raise LoRAError("this engine serves no LoRA adapters; enable them with --enable-lora (enable_lora=True, "
                            "or a `lora:` section in the config)")
        return self.lora

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None,
                       ranks: list[int] | None = None) -> list[Any]:
        """Call `method` on every worker between steps: launched steps are collected first (their outputs come
        from the next `step_fn()`)."""
        while self.batch_queue:
            self._deferred.append(self.step_end(self.batch_queue.popleft()))
        return self.executor.collective_rpc(method, args, kwargs, ranks)

    def step(self) -> list[EngineCoreOutput]:
        """One synchronous step: schedule -> execute -> update. Deferred outputs (aborts) come first, alone: one
        request never appears twice in one batch."""
        if self._deferred:
            return self._deferred.popleft()
        pending = self.step_begin()
        return self.step_end(pending) if pending is not None else []

    def step_with_batch_queue(self) -> list[EngineCoreOutput]:
        """A pipelined step: collect the oldest launched step with the next one already running on the device, so
        the device never waits for the caller's output handling; with async scheduling the next step is launched
        *before* the oldest is collected (on placeholders), so it never waits for scheduling either."""
        if self._deferred:
            return self._deferred.popleft()
        queue = self.batch_queue
        if not queue:
            self._launch()
        if self.async_scheduling and queue:
            self._launch()
        outputs = self.step_end(queue.popleft()) if queue else []
        while queue and not self.scheduler.has_unfinished_requests():
            outputs += self.step_end(queue.popleft())  # launched for requests that have all finished since
        if not queue:
            self._launch()
        return outputs

    def step_with_pipeline(self) -> list[EngineCoreOutput]:
        """Pipeline parallelism: launch scheduled steps until one per stage is in flight (or the scheduler has no
        new work: requests whose last token is still in flight wait for it), then collect the oldest."""
        if self._deferred:
            return self._deferred.popleft()
        queue = self.batch_queue
        while len(queue) < self.max_concurrent_batches and self._launch(skip_empty=bool(queue)):
            pass
        return self.step_end(queue.popleft()) if queue else []

    def _launch(self, skip_empty: bool = False) -> bool:
        pending = self.step_begin(skip_empty)
        if pending is not None:
            self.batch_queue.append(pending)
        return pending is not None

    def step_begin(self, skip_empty: bool = False) -> PendingStep | None:
        """Schedule and launch a step without waiting for the device; None when there is nothing to run (with
        `skip_empty`, also when the step would carry nothing for the workers)."""
        if not self.scheduler.has_unfinished_requests():
            return None
        scheduler_output = self.scheduler.schedule()
        if skip_empty and scheduler_output.is_empty and not (scheduler_output.finished_req_ids or
                                                             scheduler_output.preempted_req_ids):
            return None
        if self._stage_tokens:
            scheduler_output.new_token_ids, self._stage_tokens = self._stage_tokens, {}
        if scheduler_output.is_empty and not self._num_inflight:  # with a step in flight, waiting is progress
            self._idle_steps += 1
            if self._idle_steps > MAX_IDLE_STEPS:
                raise EngineError(f"the scheduler made no progress for {MAX_IDLE_STEPS} steps with "
                                  f"{self.scheduler.get_stats()}")
        else:
            self._idle_steps = 0
        try:
            future = self.executor.execute_model_async(scheduler_output)
        except EngineDeadError:
            raise
        except Exception as e:  # isolated in step_end: the step's requests fail, the engine goes on
            future = _FailedFuture(e)
        self._num_inflight += 1
        return PendingStep(scheduler_output, future)

    def step_end(self, pending: PendingStep) -> list[EngineCoreOutput]:
        """Wait for a launched step and fold its output into the scheduler. Steps end in launch order. Without
        async scheduling it must precede the next step_begin; with it, one more step may be launched first."""
        scheduler_output = pending.scheduler_output
        self._num_inflight -= 1
        try:
            outputs = self.scheduler.update_from_output(scheduler_output, pending.future.result())
            self._consecutive_failures = 0
            if self._stage_tokens is not None:
                for out in outputs:
                    if out.new_token_ids:
                        self._stage_tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        except EngineDeadError:
            raise  # a worker process is gone: nothing to isolate
        except Exception as e:
            outputs = self._fail_step(scheduler_output, e)
        self.last_stats = self.scheduler.get_stats()
        if self.async_scheduling:  # the scheduler has planned the next step already: report this one's counts
            self.last_stats = dataclasses.replace(
                self.last_stats, num_scheduled_tokens=scheduler_output.total_num_scheduled_tokens,
                num_preempted=len(scheduler_output.preempted_req_ids))
        if not scheduler_output.is_empty:
            self.registry.hook.weavelm_step_finished(stats=self.last_stats)
        return outputs

    def _fail_step(self, scheduler_output: SchedulerOutput, error: Exception) -> list[EngineCoreOutput]:
        self._consecutive_failures += 1
        req_ids = list(scheduler_output.num_scheduled_tokens)
        logger.error("step failed for requests %s: %s\n%s", req_ids, error, traceback.format_exc())
        if self._consecutive_failures > MAX_CONSECUTIVE_FAILURES:
            self._consecutive_failures = 0
            raise EngineError(f"{MAX_CONSECUTIVE_FAILURES} engine steps in a row failed; last error: "
                              f"{type(error).__name__}: {error}") from error
        outputs = self.scheduler.finish_requests(req_ids, RequestStatus.FINISHED_ERROR)
        message = f"the engine step running this request failed: {type(error).__name__}: {error}"
        for out in outputs:
            out.error = message
        return outputs

    def shutdown(self) -> None:
        try:
            while self.batch_queue:
                self.step_end(self.batch_queue.popleft())
        except EngineError:  # a dead or failing executor still has to release its workers
            pass
        finally:
            self.executor.shutdown()
        if self.async_scheduling:
            gc.unfreeze()
