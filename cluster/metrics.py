"""The project's own Prometheus metrics, next to Ray Serve's (request counts, latencies, replicas).

Recorded with `ray.serve.metrics` (tagged with deployment and replica) and exported by Ray's metrics
agent on every node (`ray start --metrics-export-port`, scraped by Prometheus like Serve's own); Ray
prefixes every name with `ray_`:

    entropyinfer_prefill_tokens_total            counter    tokens prefilled, by policy
    entropyinfer_prefill_tokens_per_second       gauge      of the last request, by policy
    entropyinfer_prefill_density                 histogram  fraction of causal attention work computed
    entropyinfer_engine_requests_in_flight       gauge      requests inside an engine replica
    entropyinfer_job_queue_length                gauge      queued document jobs (ingress)
    entropyinfer_jobs_finished_total             counter    document jobs by final state
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

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
