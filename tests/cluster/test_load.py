"""Load and backpressure against the local Serve app on 127.0.0.1.

The load test runs against the app in a process of its own with a random-weight Llama (app_process):
200 x 32 with SmolLM2 on 2 cores took 50 s (p50 6.5 s) with the long job, over this suite's budget. The
backpressure tests use the session's SmolLM2 server (its queue limit is 16 running + 24 waiting).

Figures (printed, collected in docs/reliability.md): 200 short completions from 32 concurrent clients
while a long document job runs (p50/p99 latency, errors, the job's outcome); a burst past the queue
limit answered 503 with Retry-After, and the SDK retrying through such a burst.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from entropyinfer.cluster.client import Client
from entropyinfer.cluster.launcher import EmbeddedServer

from .app_process import AUTH as APP_AUTH
from .app_process import App
from .conftest import API_KEY
from .loadgen import run_load

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


def test_a_burst_past_the_queue_limit_gets_503_with_retry_after(server: EmbeddedServer) -> None:
    capacity = 16 + server.config.limits.max_waiting_requests  # engine slots + waiting
    load = run_load(
        server.url,
        "/v1/completions",
        lambda i: _completion(i, 3),
        AUTH,
        count=2 * capacity,
        concurrency=2 * capacity,
        deadline_s=120.0,
    )
    refused, served = load.count(503), load.count(200)
    print(
        f"\nFIGURE backpressure: {2 * capacity} at once past a limit of {capacity}: {served} served, "
        f"{refused} refused 503 (Retry-After {sorted(set(load.retry_after))}), other "
        f"{len(load.statuses) - served - refused}, max latency {max(load.latencies_s):.1f}s"
    )
    assert served + refused == 2 * capacity  # nothing hung, nothing else
    assert refused >= 1 and served >= capacity - 8
    assert all(a == str(server.config.limits.retry_after_s) for a in load.retry_after)


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
