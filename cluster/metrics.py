"""The project's own Prometheus metrics, next to Ray Serve's (request counts, latencies, replicas).

The engine gauges are refreshed by every status call (/healthz, /metrics) and by Serve's periodic
health check of the replica. The ingress also answers `GET /metrics` itself (cluster/engine_health.py).

Recorded with `ray.serve.metrics` (tagged with deployment and replica) and exported by Ray's metrics
agent on every node (`ray start --metrics-export-port`, scraped by Prometheus like Serve's own); Ray
prefixes every name with `ray_`:

    entropyinfer_prefill_tokens_total            counter    tokens prefilled, by policy
    entropyinfer_prefill_tokens_per_second       gauge      of the last request, by policy
    entropyinfer_prefill_density                 histogram  fraction of causal attention work computed
    entropyinfer_engine_requests_in_flight       gauge      requests inside an engine replica
    entropyinfer_engine_sequences                gauge      engine-core sequences, by shard and state
                                                            (running, waiting, swapped)
    entropyinfer_engine_preemptions              gauge      preemptions so far, by shard
    entropyinfer_engine_kv_pages_used            gauge      KV pages in use, by shard
    entropyinfer_engine_kv_pages_total           gauge      KV pages in the pool, by shard
    entropyinfer_engine_prefix_cache_hit_rate    gauge      prompt tokens from the prefix cache / looked up
    entropyinfer_job_queue_length                gauge      queued document jobs (ingress)
    entropyinfer_jobs_finished_total             counter    document jobs by final state
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ray.serve.metrics import Counter, Gauge, Histogram

from entropyinfer.cluster.engine_health import STATES, shard_counts
from entropyinfer.cluster.events import Final

DENSITY_BUCKETS = [0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]


class EngineMetrics:
    def __init__(self) -> None:
        self.prefill_tokens = Counter(
            "entropyinfer_prefill_tokens_total", description="Prompt tokens prefilled.", tag_keys=("policy",)
        )
        self.prefill_tps = Gauge(
            "entropyinfer_prefill_tokens_per_second",
            description="Prefill throughput of the last request.",
            tag_keys=("policy",),
        )
        self.density = Histogram(
            "entropyinfer_prefill_density",
            description="Fraction of causal attention work computed in prefill (1.0 is dense).",
            boundaries=DENSITY_BUCKETS,
            tag_keys=("policy",),
        )
        self.in_flight = Gauge(
            "entropyinfer_engine_requests_in_flight", description="Requests running in this engine replica."
        )
        self._in_flight = 0
        self.sequences = Gauge(
            "entropyinfer_engine_sequences",
            description="Engine-core sequences by queue (running, waiting, swapped).",
            tag_keys=("shard", "state"),  # type: ignore[arg-type]  # Ray annotates a 1-tuple
        )
        self.preemptions = Gauge(
            "entropyinfer_engine_preemptions", description="Sequences preempted so far.", tag_keys=("shard",)
        )
        self.kv_used = Gauge(
            "entropyinfer_engine_kv_pages_used", description="KV pages in use.", tag_keys=("shard",)
        )
        self.kv_total = Gauge(
            "entropyinfer_engine_kv_pages_total", description="KV pages in the pool.", tag_keys=("shard",)
        )
        self.hit_rate = Gauge(
            "entropyinfer_engine_prefix_cache_hit_rate",
            description="Prompt tokens served from the prefix cache / prompt tokens looked up.",
            tag_keys=("shard",),
        )

    def record_shards(self, shards: Sequence[Mapping[str, Any]]) -> None:
        """Set the engine gauges from each shard's stats (`ShardStats`)."""
        for rank, shard in enumerate(shards):
            c = shard_counts(rank, shard)
            tags = {"shard": str(rank)}
            for state in STATES:
                self.sequences.set(c[state], tags={**tags, "state": state})  # type: ignore[literal-required]
            self.preemptions.set(c["preempted"], tags=tags)
            self.kv_used.set(c["kv_pages_used"], tags=tags)
            self.kv_total.set(c["kv_pages_total"], tags=tags)
            self.hit_rate.set(c["prefix_cache_hit_rate"], tags=tags)

    @property
    def in_flight_count(self) -> int:
        return self._in_flight

    def inflight(self, delta: int) -> None:
        self._in_flight += delta
        self.in_flight.set(self._in_flight)

    def record(self, final: Final, policy: str, seconds: float) -> None:
        stats = final.stats
        tags = {"policy": str(stats.get("policy") or policy)}
        tokens = final.prompt_tokens if not final.cancelled else 0
        if tokens > 0:
            self.prefill_tokens.inc(tokens, tags=tags)
            prefill_ms = stats.get("prefill_ms")
            if isinstance(prefill_ms, (int, float)) and prefill_ms > 0:
                self.prefill_tps.set(tokens / (prefill_ms / 1e3), tags=tags)
        density = stats.get("density")
        if isinstance(density, (int, float)):
            self.density.observe(float(density), tags=tags)


class JobMetrics:
    def __init__(self) -> None:
        self.queue_length = Gauge(
            "entropyinfer_job_queue_length", description="Document jobs waiting to run."
        )
        self.finished = Counter(
            "entropyinfer_jobs_finished_total",
            description="Document jobs by final state.",
            tag_keys=("state",),
        )
