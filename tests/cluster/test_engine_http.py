"""The engine core seen over real HTTP (the session's Serve app, real SmolLM2 on CPU): /healthz and
/metrics report its queues, KV pages and prefix cache; usage carries cached tokens, attention density and
KV bytes; a document's questions run together; a disconnect or a job cancel gives every KV page back."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from entropyinfer.cluster.client import Client
from entropyinfer.cluster.config import JobsConfig
from entropyinfer.cluster.job_worker import build_prompt
from entropyinfer.cluster.launcher import EmbeddedServer
from entropyinfer.shard.llm import LLM
from entropyinfer.shard.sampling import SamplingParams

from .conftest import API_KEY

pytestmark = [pytest.mark.serve, pytest.mark.slow]

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "The capital of France is"
STORY = "Once upon a time, in a land far away,"  # greedy SmolLM2 writes all 64 tokens
CORE_KEYS = {"running", "waiting", "swapped", "preempted", "kv_pages_used", "kv_pages_total"}


@pytest.fixture(scope="module")
def url(server: EmbeddedServer) -> str:
    return server.url


def _core(server: EmbeddedServer) -> dict[str, Any]:
    """The engine core's counts of the (one) shard, from the engine replica's live status."""
    from ray import serve

    handle = serve.get_deployment_handle("Engine", app_name=server.app_name)
    status = handle.status.remote().result(timeout_s=60)
    return dict(status["shards"][0]["engine_core"])


def _pages_back(server: EmbeddedServer, timeout_s: float = 30.0) -> dict[str, Any]:
    """The core's counts once nothing runs or waits and no KV page is in use (as last seen after
    `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        core = _core(server)
        if (core["running"], core["waiting"], core["kv_pages_used"]) == (0, 0, 0):
            return core
        if time.monotonic() > deadline:
            return core
        time.sleep(0.1)


def _offline(llm: LLM, prompt: str | list[dict[str, str]], max_tokens: int) -> str:
    return llm.generate(prompt, SamplingParams(max_tokens=max_tokens))[0].text


# ---- health and metrics ----------------------------------------------------------------------------


def test_healthz_reports_the_engine_cores_queues_and_pages(url: str) -> None:
    r = httpx.get(url + "/healthz", timeout=30)
    assert r.status_code == 200, r.text
    engine = r.json()["engine"]
    assert engine["replica"] and engine["in_flight"] >= 0
    (shard,) = engine["shards"]
    assert CORE_KEYS | {"prefix_cache_hit_rate", "shard"} <= set(shard)
    assert shard["kv_pages_total"] > 0 and 0 <= shard["kv_pages_used"] <= shard["kv_pages_total"]
    assert 0.0 <= shard["prefix_cache_hit_rate"] <= 1.0


def test_metrics_are_prometheus_text_with_the_engine_counts(url: str) -> None:
    assert httpx.get(url + "/metrics", timeout=30).status_code == 401  # the API key, as every route
    r = httpx.get(url + "/metrics", headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, s.labels.get("state", "")): s
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }
    assert samples[("entropyinfer_up", "")].value == 1
    for state in ("running", "waiting", "swapped"):
        sample = samples[("entropyinfer_sequences", state)]
        assert sample.labels["shard"] == "0" and sample.labels["replica"]
    assert samples[("entropyinfer_kv_pages_total", "")].value > 0
    names = {name for name, _ in samples}
    assert {
        "entropyinfer_kv_pages_used",
        "entropyinfer_kv_pages_usage",
        "entropyinfer_preemptions_total",
        "entropyinfer_prefix_cache_pages",
        "entropyinfer_prefix_cache_hit_rate",
        "entropyinfer_prefix_cache_queries_total",
        "entropyinfer_prefix_cache_hits_total",
        "entropyinfer_engine_requests_in_flight",
        "entropyinfer_job_queue_length",
    } <= names


# ---- usage -------------------------------------------------------------------------------------------


def _check_usage(usage: dict[str, Any], stats: dict[str, Any] | None = None) -> None:
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert isinstance(cached, int) and 0 <= cached <= usage["prompt_tokens"]
    assert usage["attention_density"] == 1.0  # the session's default policy is dense
    assert isinstance(usage["kv_bytes_kept"], int) and usage["kv_bytes_kept"] > 0
    if stats is not None:
        assert cached == stats.get("cached_tokens", 0) and usage["kv_bytes_kept"] == stats["kv_bytes"]


def test_usage_carries_cached_tokens_density_and_kv_bytes(url: str) -> None:
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    _check_usage(r.json()["usage"], r.json()["entropyinfer"])
    chat = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 3, "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions", json=chat, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    _check_usage(r.json()["usage"], r.json()["entropyinfer"])
    for path, request in (("/v1/completions", body), ("/v1/chat/completions", chat)):
        streamed = {**request, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + path, json=streamed, headers=AUTH, timeout=120) as resp:
            lines = [line for line in resp.iter_lines() if line.startswith("data:")]
        assert lines[-1] == "data: [DONE]"
        last = json.loads(lines[-2][5:])
        assert last["choices"] == []
        _check_usage(last["usage"])


def test_a_repeated_prefix_is_served_from_the_prefix_cache(url: str) -> None:
    prefix = "The history of the city of Paris, told in short paragraphs. " * 12  # > 100 tokens
    outs = []
    for question in ("Who founded it?", "When was it founded?"):
        body = {"prompt": prefix + question, "max_tokens": 2, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=120)
        assert r.status_code == 200, r.text
        outs.append(r.json())
    from entropyinfer.shard.attention import DensePrefill

    if not getattr(DensePrefill(), "chunkable", False):  # the engine core caches chunkable policies' pages
        pytest.skip("the dense prefill is not chunkable yet, so its pages are not cached")
    summary = httpx.get(url + "/healthz", timeout=30).json()["engine"]["shards"][0]
    cached = outs[1]["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert 64 <= cached < outs[1]["usage"]["prompt_tokens"], outs[1]["usage"]
    assert cached == outs[1]["entropyinfer"]["cached_tokens"]
    assert summary["prefix_cache_hits"] > 0 and summary["prefix_cache_hit_rate"] > 0


# ---- document jobs: the questions of a document together --------------------------------------------


def test_a_document_job_with_several_questions(server: EmbeddedServer, smollm2: LLM) -> None:
    doc = "The Eiffel Tower is in Paris. It was finished in 1889 for the World's Fair. " * 3
    questions = ["In which city is the tower?", "When was it finished?"]
    with Client(server.url, api_key=API_KEY, retries=2, backoff_s=0.2) as client:
        job = client.submit([doc], questions=questions, max_tokens=6)
        done = client.wait(job.id, poll_s=0.2, timeout=300, progress=False)
        assert done.state == "succeeded" and done.prefill_tokens_done == done.prefill_tokens_total
        results = client.results(job.id)
    assert [(r.document_index, r.question_index) for r in results] == [(0, 0), (0, 1)]
    jobs = JobsConfig()
    for question, r in zip(questions, results, strict=True):
        prompt = build_prompt(doc, question, jobs.system_prompt, jobs.prompt_template)
        assert r.question == question and r.text == _offline(smollm2, prompt, 6), (r.text, question)
        assert r.stats["prompt_tokens"] == smollm2.count_tokens(prompt)
    assert _pages_back(server)["kv_pages_used"] == 0


# ---- cancel and disconnect free the pages -------------------------------------------------------------


def test_a_disconnected_stream_gives_its_kv_pages_back(server: EmbeddedServer, url: str) -> None:
    body = {"prompt": STORY, "max_tokens": 64, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("data:"):
                assert _core(server)["kv_pages_used"] > 0  # the stream holds its pages while it runs
                break  # hang up after the first token
    core = _pages_back(server)
    assert (core["running"], core["waiting"], core["kv_pages_used"]) == (0, 0, 0), core


def test_a_cancelled_job_gives_its_kv_pages_back(server: EmbeddedServer) -> None:
    doc = "The quick brown fox jumps over the lazy dog. " * 40
    with Client(server.url, api_key=API_KEY, retries=2, backoff_s=0.2) as client:
        job = client.submit([doc], questions=["Tell a long story.", "Tell another."], max_tokens=64)
        deadline = time.monotonic() + 120
        while _core(server)["running"] < 1:  # its questions are in the engine
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client.cancel(job.id)
        assert client.wait(job.id, poll_s=0.1, timeout=60, progress=False).state == "cancelled"
    core = _pages_back(server)
    assert (core["running"], core["waiting"], core["kv_pages_used"]) == (0, 0, 0), core
