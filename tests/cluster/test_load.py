"""Load and backpressure against the local Serve app on 127.0.0.1.

The load test runs against the app in a process of its own with a random-weight Llama (app_process):
200 x 32 with SmolLM2 on 2 cores took 50 s (p50 6.5 s) with the long job, over this suite's budget. The
backpressure tests use the session's SmolLM2 server (its queue limit is 16 running + 24 waiting).

Figures (printed, collected in docs/reliability.md): 200 short completions from 32 concurrent clients
while a long document job runs (p50/p99 latency, errors, the job's outcome); two bursts past the queue
limit answered 503 with Retry-After, the engine's queues and KV pages under their limits and the Ray
processes' memory flat from one burst to the next; and the SDK retrying through such a burst.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from entropyinfer.cluster.client import Client
from entropyinfer.cluster.launcher import EmbeddedServer

from .app_process import AUTH as APP_AUTH
from .app_process import App
from .conftest import API_KEY
from .loadgen import run_load
from .test_engine_http import _pages_back

pytestmark = [pytest.mark.serve, pytest.mark.slow]

AUTH = {"Authorization": f"Bearer {API_KEY}"}
LONG_DOC_TOKENS = 6000
LONG_DOC = " ".join(
    f"Paragraph {i}: the archive lists shipments of tea, silk and copper." for i in range(120)
)


def _completion(i: int, max_tokens: int = 2) -> dict[str, object]:
    return {"prompt": f"Item {i}: the colour of the sky is", "max_tokens": max_tokens, "temperature": 0}


def test_200_completions_from_32_clients_while_a_long_job_runs(app_process: App) -> None:
    url = app_process.url
    long_doc = (LONG_DOC * 2)[:LONG_DOC_TOKENS]  # one token per byte
    job_body = {"documents": [long_doc], "questions": ["What is shipped?", "How many?"], "max_tokens": 64}
    job = httpx.post(url + "/v1/jobs", json=job_body, headers=APP_AUTH, timeout=60).json()
    load = run_load(
        url, "/v1/completions", _completion, APP_AUTH, count=200, concurrency=32, deadline_s=120.0
    )
    deadline = time.monotonic() + 120.0
    while (final := httpx.get(f"{url}/v1/jobs/{job['id']}", headers=APP_AUTH, timeout=30).json())[
        "state"
    ] not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.2)
    p50, p99 = load.percentile(0.5), load.percentile(0.99)
    print(
        f"\nFIGURE load: 200 completions x 32 clients (random-weight Llama 4x256, max_tokens=2) in "
        f"{load.wall_s:.1f}s: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, errors {load.errors}; long "
        f"job ({final['progress']['prefill_tokens_total']} prefill tokens, 2 questions) {final['state']}"
    )
    assert load.errors == 0, load.statuses
    assert len(load.latencies_s) == 200
    assert final["state"] == "succeeded", final


def _engine(url: str) -> dict[str, Any]:
    resp = httpx.get(url + "/healthz", timeout=30)
    assert resp.status_code == 200, resp.text
    return dict(resp.json()["engine"])


def _ray_rss_mib() -> float:
    """Resident memory of this session's Ray worker processes (the app's replicas, shard actor, proxy and
    controller): the raylet's descendants."""
    import psutil
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    procs = psutil.Process(raylet).children(recursive=True)
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):  # a worker that just exited
            total += proc.memory_info().rss
    return total / 2**20


class _Sampler:
    """Polls /healthz every 50 ms while a burst runs: the most running / waiting sequences, requests in
    flight and KV pages held at any sample."""

    def __init__(self, url: str) -> None:
        self.url, self.peak = url, {"running": 0, "waiting": 0, "in_flight": 0, "kv_pages_used": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                engine = _engine(self.url)
            except (httpx.HTTPError, AssertionError):  # a slow answer under the burst: the next sample
                engine = None
            if engine is not None:
                shard = engine["shards"][0]
                now = {
                    "in_flight": engine["in_flight"],
                    **{k: shard[k] for k in ("running", "waiting", "kv_pages_used")},
                }
                self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}
            self._stop.wait(0.05)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


def test_a_burst_past_the_queue_limit_gets_503_with_retry_after(server: EmbeddedServer) -> None:
    """Two bursts of twice the queue limit: each answered (200 or 503 with Retry-After, nothing hangs),
    the engine's queues never past its limits, and memory bounded: the KV pages come back after each
    burst and the Ray processes' resident memory does not grow from the first burst to the second."""
    limits = server.config.limits
    slots = server.config.engine.max_ongoing_requests * server.config.engine.num_replicas
    capacity = slots + limits.max_waiting_requests  # engine slots + waiting at the ingress
    before = _pages_back(server)["kv_pages_used"]
    rounds = []
    for _ in range(2):
        sampler = _Sampler(server.url)
        load = run_load(
            server.url,
            "/v1/completions",
            lambda i: _completion(i, 3),
            AUTH,
            count=2 * capacity,
            concurrency=2 * capacity,
            deadline_s=120.0,
        )
        peak = sampler.stop()
        after = _pages_back(server)["kv_pages_used"]
        rounds.append((load, peak, after, _ray_rss_mib()))
    for load, peak, after, _ in rounds:
        refused, served = load.count(503), load.count(200)
        print(
            f"\nFIGURE backpressure: {2 * capacity} at once past a limit of {capacity}: {served} served, "
            f"{refused} refused 503 (Retry-After {sorted(set(load.retry_after))}), other "
            f"{len(load.statuses) - served - refused}, max latency {max(load.latencies_s):.1f}s; peak "
            f"{peak['running']} running / {peak['waiting']} waiting sequences, {peak['in_flight']} in "
            f"flight, {peak['kv_pages_used']} KV pages; {after} pages held after it ({before} before)"
        )
        assert served + refused == 2 * capacity  # nothing hung, nothing else
        assert refused >= 1 and served >= capacity - 8
        assert all(a == str(limits.retry_after_s) for a in load.retry_after)
        # the ingress holds the waiting requests; the replica never has more than its slots
        assert peak["in_flight"] <= slots and peak["running"] + peak["waiting"] <= slots
        assert after == before  # every page of a finished or refused request is back
    growth = rounds[1][3] - rounds[0][3]
    print(
        f"\nFIGURE overload memory: Ray processes {rounds[0][3]:.0f} MiB after the first burst, "
        f"{rounds[1][3]:.0f} MiB after the second ({growth:+.0f} MiB)"
    )
    assert growth < 64  # refused and finished requests leave nothing behind that grows per burst


def test_the_sdk_retries_503_honouring_retry_after_and_succeeds(server: EmbeddedServer) -> None:
    capacity = 16 + server.config.limits.max_waiting_requests
    n = capacity + 24
    sleeps: list[float] = []
    lock = threading.Lock()
    with Client(server.url, api_key=API_KEY, retries=30, backoff_s=0.2) as client:
        real_delay = client._core.retry_delay

        def delay(attempt: int, resp: object) -> float:
            d = real_delay(attempt, resp)  # type: ignore[arg-type]
            with lock:
                sleeps.append(d)
            return d

        client._core.retry_delay = delay  # type: ignore[method-assign]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            texts = list(pool.map(lambda i: client.complete(f"Item {i}: one", max_tokens=3).text, range(n)))
    print(
        f"\nFIGURE sdk retry: {n} concurrent SDK completions past a limit of {capacity}: {len(texts)} "
        f"succeeded after {len(sleeps)} retries of 503 (waits {sorted(set(sleeps))} s) in "
        f"{time.perf_counter() - t0:.1f}s"
    )
    assert len(texts) == n
    assert sleeps and all(s == float(server.config.limits.retry_after_s) for s in sleeps)
