"""What /healthz and /metrics say about the engine: its core's queues, KV pages and prefix cache.

Read from the engine replica's live status (`EngineReplica.status`: each shard's counters, the engine
core's `counts()` among them) and shaped here, with no Ray or HTTP import:

    engine_summary(status)   the per-shard engine block of the /healthz body
    prometheus_text(...)     the Prometheus text exposition (format 0.0.4) of the ingress's /metrics

Names on /metrics (labels `replica` and `shard` on the engine's; the counters count since the replica
started):

    entropyinfer_sequences{state}                 gauge    running / waiting / swapped sequences
    entropyinfer_preemptions_total                counter  sequences preempted (recompute or swap)
    entropyinfer_kv_pages_used                    gauge    KV pages held by sequences
    entropyinfer_kv_pages_total                   gauge    KV pages in the pool
    entropyinfer_kv_pages_usage                   gauge    used / total, 0..1
    entropyinfer_prefix_cache_pages               gauge    KV pages resident in the prefix cache
    entropyinfer_prefix_cache_hit_rate            gauge    prompt tokens served from the cache / looked up
    entropyinfer_prefix_cache_queries_total       counter  prompt tokens looked up in the prefix cache
    entropyinfer_prefix_cache_hits_total          counter  prompt tokens served from it
    entropyinfer_requests_cancelled_total         counter  requests the model stopped early (cancel)
    entropyinfer_engine_requests_in_flight        gauge    requests inside the engine replica
    entropyinfer_job_queue_length                 gauge    document jobs waiting (the ingress's store)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATES = ("running", "waiting", "swapped")


class EngineCounts(TypedDict):
    """One shard's engine core, as /healthz reports it."""

    shard: int
    running: int
    waiting: int
    swapped: int
    preempted: int
    kv_pages_used: int
    kv_pages_total: int
    prefix_cache_pages: int
    prefix_cache_hit_rate: float
    prefix_cache_queries: int
    prefix_cache_hits: int


def _num(counts: Mapping[str, Any], key: str) -> float:
    value = counts.get(key, 0)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def shard_counts(rank: int, shard: Mapping[str, Any]) -> EngineCounts:
    """A shard's engine-core counts (`ShardStats.engine_core`); a key the core does not report is 0.
    `kv_pages_used` counts pages held by sequences: resident prefix-cache pages nobody references are
    free (evictable), counted in `prefix_cache_pages`."""
    core = shard.get("engine_core") or {}
    i = lambda key: int(_num(core, key))  # noqa: E731
    return {
        "shard": rank,
        "running": i("running"),
        "waiting": i("waiting"),
        "swapped": i("swapped"),
        "preempted": i("preempted"),
        "kv_pages_used": i("kv_pages_used"),
        "kv_pages_total": i("kv_pages_total"),
        "prefix_cache_pages": i("prefix_cache_pages"),
        "prefix_cache_hit_rate": round(_num(core, "prefix_cache_hit_rate"), 6),
        "prefix_cache_queries": i("prefix_cache_queries"),
        "prefix_cache_hits": i("prefix_cache_hits"),
    }


def engine_summary(status: Mapping[str, Any]) -> dict[str, Any]:
    """The engine block of /healthz: the replica, its requests in flight, each shard's core counts and, for
    a tensor-parallel group, its health (`group`)."""
    shards: Sequence[Mapping[str, Any]] = status.get("shards") or []
    summary: dict[str, Any] = {
        "replica": str(status.get("replica") or ""),
        "in_flight": int(status.get("in_flight") or 0),
        "shards": [shard_counts(rank, s) for rank, s in enumerate(shards)],
    }
    if status.get("group") is not None:  # a tensor-parallel group: its shape, state and each rank's health
        summary["group"] = status["group"]
    return summary


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Exposition:
    """Prometheus text: each metric's HELP, TYPE and samples together, in the order first added."""

    def __init__(self) -> None:
        self._families: dict[str, list[str]] = {}

    def add(self, name: str, kind: str, help_: str, value: float, labels: Mapping[str, str]) -> None:
        family = self._families.setdefault(name, [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        tags = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        family.append(f"{name}{{{tags}}} {value:g}" if tags else f"{name} {value:g}")

    def text(self) -> str:
        return "\n".join(line for family in self._families.values() for line in family) + "\n"


def prometheus_text(status: Mapping[str, Any] | None, queued_jobs: int | None = None) -> str:
    """/metrics: the engine replica's status (None: it did not answer, `entropyinfer_up 0`) and the
    ingress's job queue length."""
    out = _Exposition()
    out.add(
        "entropyinfer_up", "gauge", "1 if the engine replica answered this scrape.", float(bool(status)), {}
    )
    if queued_jobs is not None:
        out.add("entropyinfer_job_queue_length", "gauge", "Document jobs waiting to run.", queued_jobs, {})
    if not status:
        return out.text()
    summary = engine_summary(status)
    replica = {"replica": summary["replica"]}
    out.add(
        "entropyinfer_engine_requests_in_flight",
        "gauge",
        "Requests inside the engine replica.",
        summary["in_flight"],
        replica,
    )
    shards: Sequence[Mapping[str, Any]] = status.get("shards") or []
    for c, raw in zip(summary["shards"], shards, strict=True):
        tags = {**replica, "shard": str(c["shard"])}
        for state in STATES:
            out.add(
                "entropyinfer_sequences",
                "gauge",
                "Sequences in the engine core by queue (running, waiting, swapped).",
                c[state],
                {**tags, "state": state},
            )
        total = c["kv_pages_total"]
        rows: list[tuple[str, str, str, float]] = [
            ("preemptions_total", "counter", "Sequences preempted (recompute or swap).", c["preempted"]),
            ("kv_pages_used", "gauge", "KV pages held by sequences.", c["kv_pages_used"]),
            ("kv_pages_total", "gauge", "KV pages in the pool.", total),
            (
                "kv_pages_usage",
                "gauge",
                "KV pages used / total.",
                c["kv_pages_used"] / total if total else 0.0,
            ),
            (
                "prefix_cache_pages",
                "gauge",
                "KV pages resident in the prefix cache.",
                c["prefix_cache_pages"],
            ),
            (
                "prefix_cache_hit_rate",
                "gauge",
                "Prompt tokens served from the prefix cache / prompt tokens looked up.",
                c["prefix_cache_hit_rate"],
            ),
            (
                "prefix_cache_queries_total",
                "counter",
                "Prompt tokens looked up in the prefix cache.",
                c["prefix_cache_queries"],
            ),
            (
                "prefix_cache_hits_total",
                "counter",
                "Prompt tokens served from the prefix cache.",
                c["prefix_cache_hits"],
            ),
            (
                "requests_cancelled_total",
                "counter",
                "Requests the model stopped early because they were cancelled.",
                _num(raw, "cancelled"),
            ),
        ]
        for name, kind, help_, value in rows:
            out.add(f"entropyinfer_{name}", kind, help_, value, tags)
    return out.text()
