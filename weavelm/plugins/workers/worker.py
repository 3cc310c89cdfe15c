"""The default Worker: one device, one model runner."""

from __future__ import annotations

import logging
from typing import Any

import torch

from weavelm.core.device import resolve_device
from weavelm.core.hookspecs import hookimpl
from weavelm.core.interfaces import NoOptions, Worker
from weavelm.core.outputs import ModelRunnerOutput, RunnerFuture, SchedulerOutput
from weavelm.errors import ConfigError
from weavelm.ops.memory import check_fits

logger = logging.getLogger("weavelm.worker")
GIB = 1 << 30


class DeviceWorker(Worker):
    name = "device"
    description = "One device: seeds, loads the model through the runner, sizes the KV cache."
    Options = NoOptions

    def init_device(self) -> None:
        self.device = resolve_device(self.config.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.rank % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
        if self.world_size > 1:  # the default group, then every tensor-parallel group and pipeline of the layout
            from weavelm.distributed import default_backend, init_parallel

            init_parallel(self.context.layout, self.rank, self.context.distributed_init_method,
                          default_backend(self.device.type))
        torch.manual_seed(self.config.seed)
        self.runner = self.context.build_runner(self.device)

    def load_model(self) -> None:
        # what this process already held on the device (another engine, a test's reference model): not this
        # engine's, so the KV budget below does not charge it to `gpu_memory_utilization`
        self._baseline = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        self.runner.load_model()

    def model_info(self) -> dict[str, Any]:
        return {**self.runner.model_info(), "device": str(self.device)}

    def determine_num_blocks(self) -> int:
        cache = self.config.cache
        per_block = self.runner.kv_cache_bytes_per_block()
        if cache.num_blocks is not None:
            check_fits(cache.num_blocks * per_block, self.device, "cache.num_blocks",
                       f"cache.num_blocks={cache.num_blocks} ({per_block} bytes each)", "lower cache.num_blocks")
            return cache.num_blocks
        if self.device.type == "cuda":
            peak = self.runner.profile_peak_memory()
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(self.device).total_memory
            own_peak = peak - getattr(self, "_baseline", 0)  # weights + the worst step's activations
            activations = peak - torch.cuda.memory_allocated(self.device)
            free_now, _ = torch.cuda.mem_get_info(self.device)
            # vLLM's rule (this engine's share of the card, minus what it needs besides the KV cache), capped by
            # what is actually free (other processes or engines on the card keep theirs)
            free_for_kv = min(int(total * cache.gpu_memory_utilization) - own_peak, free_now - activations)
            n = free_for_kv // per_block
            logger.info("KV cache: peak step %.2f GiB, %d blocks (%.2f GiB)", peak / GIB, n, n * per_block / GIB)
        else:
            n = int(cache.cpu_kv_cache_gib * GIB) // per_block
            check_fits(n * per_block, self.device, "cache.cpu_kv_cache_gib",
                       f"cache.cpu_kv_cache_gib={cache.cpu_kv_cache_gib:g}", "lower cache.cpu_kv_cache_gib")
        if n < 1:
            raise ConfigError([("cache", "no memory left for the KV cache; lower max_num_batched_tokens, raise "
                                         "gpu_memory_utilization / cpu_kv_cache_gib, or set cache.num_blocks")])
        return n

    def initialize_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(scheduler_output)

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> RunnerFuture:
        return self.runner.execute_model_async(scheduler_output)

    def set_logits_hook(self, hook) -> None:
        self.runner.set_logits_hook(hook)

    def apply_model(self, func) -> Any:
        return func(self.runner.get_model())

    def cached_request_ids(self) -> list[str]:
        return self.runner.cached_request_ids()

    def apply_proposer(self, func) -> Any:
        return func(self.runner.get_proposer())

    def pipeline_timeline(self) -> list:
        """This pipeline stage's compute spans since the last call (`pipeline_stage.StageSpan`); [] without
        pipeline parallelism."""
        link = getattr(self.runner, "pipeline", None)
        return link.take_timeline() if link is not None else []


@hookimpl
def weavelm_register(registry) -> None:
    registry.add("worker", DeviceWorker.name, DeviceWorker, aliases=("worker",))
