"""Prometheus metrics of one server (`/metrics`), on a per-app registry, named like vLLM's (`weavelm:` for
`vllm:`). Gauges are read from the engine's stats at scrape time; latencies and token counts are observed as
outputs reach the event loop."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from weavelm.core.async_llm import RequestStream
from weavelm.core.llm_engine import EngineStats
from weavelm.core.outputs import RequestOutput

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
               0.5, 0.75, 1.0, 2.5)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """One server's metrics. `observe` is called for every engine output a request stream receives.

    With `multiprocess_dir` (one of several API-server processes, whose environment had PROMETHEUS_MULTIPROC_DIR
    set to it before prometheus_client was imported) the values live in that directory and `render()` sums the
    counters and histograms of every process; the engine gauges show the most recent value any process set."""

    def __init__(self, model_name: str, multiprocess_dir: str | None = None):
        self.multiprocess_dir = multiprocess_dir
        # Prometheus' own registry, one per app (not a plugin registry); in multiprocess mode the values are
        # collected from the directory instead
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        r = self.registry if multiprocess_dir is None else None
        gauge_mode = {} if multiprocess_dir is None else {"multiprocess_mode": "mostrecent"}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"weavelm:{name}", doc, labels, registry=r, **gauge_mode).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(f"weavelm:{name}", doc, labels, buckets=buckets, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"weavelm:{name}", doc, labels, registry=r).labels(model_name)

        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Share of KV cache blocks in use (1 = full).")
        self.kv_used_blocks = gauge("kv_cache_used_blocks", "KV cache blocks held by unfinished requests.")
        self.kv_total_blocks = gauge("kv_cache_total_blocks", "KV cache blocks in the pool.")
        self.kv_block_bytes = gauge("kv_cache_block_bytes", "Bytes of one KV cache block over all layers, on one "
                                                            "worker (halved by an fp8 KV cache).")
        self.prefix_hit_rate = gauge("prefix_cache_hit_rate", "Share of queried prompt tokens found in the "
                                                              "prefix cache (cumulative).")
        self.spec_drafts = gauge("spec_decode_num_draft_tokens", "Draft tokens verified (cumulative).")
        self.spec_accepted = gauge("spec_decode_num_accepted_tokens", "Draft tokens accepted (cumulative).")
        self.spec_acceptance = gauge("spec_decode_acceptance_rate", "Accepted / verified draft tokens.")
        self.spec_mean_len = gauge("spec_decode_mean_accepted_length", "Tokens emitted per verifying "
                                                                       "request-step (accepted drafts + 1).")
        self.spec_proposer_time = gauge("spec_decode_proposer_time_seconds", "Wall time spent proposing drafts "
                                                                            "(cumulative).")
        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first output token.",
                              LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between successive output tokens.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the last output.",
                             LATENCY_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self._finished = Counter("weavelm:request_success", "Finished requests by finish reason.",
                                 labels + ["finished_reason"], registry=r)
        self._model_name = model_name
        self._registry, self._gauge_mode = r, gauge_mode
        self._replica_gauges: dict[str, Gauge] | None = None  # data parallelism: made on the first replica stats

    def observe(self, stream: RequestStream, out: RequestOutput, new_tokens: int, previous_token_time: float | None,
                now: float) -> None:
        if new_tokens > 0:
            self.generation_tokens.inc(new_tokens)
            if previous_token_time is None:
                self.ttft.observe(now - stream.arrival)
            else:
                gap = (now - previous_token_time) / new_tokens
                for _ in range(new_tokens):
                    self.itl.observe(gap)
        if out.finished:
            self.e2e.observe(now - stream.arrival)
            self.prompt_tokens.inc(len(out.prompt_token_ids))
            reason = out.outputs[0].finish_reason if out.outputs else None
            self._finished.labels(self._model_name, str(reason)).inc()

    def set_stats(self, stats: EngineStats) -> None:
        self.running.set(stats.num_running_reqs)
        self.waiting.set(stats.num_waiting_reqs)
        self.kv_usage.set(stats.kv_cache_usage)
        self.kv_used_blocks.set(stats.num_used_blocks)
        self.kv_total_blocks.set(stats.num_total_blocks)
        self.kv_block_bytes.set(stats.kv_block_bytes)
        self.prefix_hit_rate.set(stats.prefix_cache_hit_rate)
        self.spec_drafts.set(stats.spec_num_draft_tokens)
        self.spec_accepted.set(stats.spec_num_accepted_tokens)
        self.spec_acceptance.set(stats.spec_acceptance_rate)
        self.spec_mean_len.set(stats.spec_mean_accepted_length)
        self.spec_proposer_time.set(stats.spec_proposer_time_s)
        if stats.replicas:
            self._set_replica_stats(stats.replicas)

    def _set_replica_stats(self, replicas: tuple) -> None:
        """Data parallelism: the gauges above sum the replicas; these show each one, labelled `engine` (its
        index, as vLLM labels its data-parallel engines)."""
        if self._replica_gauges is None:
            docs = {"num_requests_running": "Requests in the replica's running batch.",
                    "num_requests_waiting": "Requests waiting in the replica's queue.",
                    "kv_cache_usage_perc": "Share of the replica's KV cache blocks in use.",
                    "num_requests_routed": "Requests the client sent to the replica since start.",
                    "num_preemptions": "The replica's preemptions since start.",
                    "alive": "1 while the replica's engine core is alive, 0 once it died."}
            self._replica_gauges = {
                name: Gauge(f"weavelm:dp_replica_{name}", doc, ["model_name", "engine"], registry=self._registry,
                            **self._gauge_mode) for name, doc in docs.items()}
        g = self._replica_gauges
        for row in replicas:
            labels = (self._model_name, str(row.index))
            g["num_requests_running"].labels(*labels).set(row.num_running_reqs)
            g["num_requests_waiting"].labels(*labels).set(row.num_waiting_reqs)
            g["kv_cache_usage_perc"].labels(*labels).set(row.kv_cache_usage)
            g["num_requests_routed"].labels(*labels).set(row.num_requests)
            g["num_preemptions"].labels(*labels).set(row.num_preemptions)
            g["alive"].labels(*labels).set(1 if row.alive else 0)

    def render(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry(auto_describe=True)
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        return generate_latest(registry)
