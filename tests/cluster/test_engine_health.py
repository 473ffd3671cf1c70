"""The /healthz engine block, the /metrics text and OpenAI usage, from made-up engine states (no Ray)."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from entropyinfer.cluster.engine_health import engine_summary, prometheus_text
from entropyinfer.cluster.events import Final
from entropyinfer.cluster.openai_format import usage

CORE = {"running": 3, "waiting": 2, "swapped": 1, "preempted": 4, "kv_pages_used": 30, "kv_pages_total": 120}
CACHE = {"prefix_cache_pages": 7, "prefix_cache_queries": 400, "prefix_cache_hits": 100}


def _status(*cores: dict[str, Any]) -> dict[str, Any]:
    shards = [{"busy": 1, "running": 1, "cancelled": 5, "early_cancels": 0, "engine_core": c} for c in cores]
    return {"replica": 'r"1', "in_flight": 2, "shards": shards, "device": "cpu"}


def test_healthz_block_reads_every_count_and_defaults_missing_ones_to_zero() -> None:
    summary = engine_summary(_status({**CORE, **CACHE, "prefix_cache_hit_rate": 0.25}, {"running": 1}))
    assert summary["replica"] == 'r"1' and summary["in_flight"] == 2
    first, second = summary["shards"]
    assert first == {"shard": 0, **CORE, **CACHE, "prefix_cache_hit_rate": 0.25}
    assert second["running"] == 1 and second["kv_pages_total"] == 0 and second["prefix_cache_hit_rate"] == 0.0


def test_metrics_text_parses_with_each_family_together_and_labels_per_shard() -> None:
    text = prometheus_text(_status({**CORE, "prefix_cache_hit_rate": 0.5}, dict(CORE, running=9)), 4)
    families = {f.name: f for f in text_string_to_metric_families(text)}  # the parser rejects split families
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names))  # one HELP/TYPE block per metric
    running = {
        s.labels["shard"]: s.value
        for s in families["entropyinfer_sequences"].samples
        if s.labels["state"] == "running"
    }
    assert running == {"0": 3, "1": 9}
    assert families["entropyinfer_sequences"].samples[0].labels["replica"] == 'r"1'  # escaped and read back
    usage_ = {s.labels["shard"]: s.value for s in families["entropyinfer_kv_pages_usage"].samples}
    assert usage_ == {"0": 0.25, "1": 0.25}
    assert families["entropyinfer_preemptions"].type == "counter"  # the parser drops the _total suffix
    assert families["entropyinfer_job_queue_length"].samples[0].value == 4
    assert families["entropyinfer_up"].samples[0].value == 1
    assert families["entropyinfer_requests_cancelled"].samples[0].value == 5


def test_metrics_text_when_the_engine_does_not_answer() -> None:
    families = {f.name: f for f in text_string_to_metric_families(prometheus_text(None, 0))}
    assert families["entropyinfer_up"].samples[0].value == 0 and "entropyinfer_sequences" not in families


def test_usage_sums_cached_tokens_and_kv_bytes_and_weights_density_by_causal_work() -> None:
    outs = [
        Final("a", "stop", 2, 10, {"cached_tokens": 4, "density": 1.0, "kv_bytes": 100}),
        Final("b", "stop", 3, 30, {"density": 0.5, "kv_bytes": 300}),  # no cached_tokens: none cached
    ]
    u = usage(outs)
    assert (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]) == (40, 5, 45)
    assert u["prompt_tokens_details"] == {"cached_tokens": 4} and u["kv_bytes_kept"] == 400
    work = [10 * 11 / 2, 30 * 31 / 2]
    assert abs(u["attention_density"] - (work[0] * 1.0 + work[1] * 0.5) / sum(work)) < 1e-6
    bare = usage([Final("", "cancelled", 0, 5)])
    assert bare["attention_density"] is None and bare["kv_bytes_kept"] is None
    assert bare["prompt_tokens_details"]["cached_tokens"] == 0
