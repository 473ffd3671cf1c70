"""A bounded load generator: `count` requests from `concurrency` threads, stopped at `deadline_s`.

Each request is one POST over its thread's own HTTP connection; the result holds every latency and
status (a request still unanswered at the deadline is never sent: the generator cannot hang a test).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx


@dataclass
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)  # 0: a transport error
    retry_after: list[str | None] = field(default_factory=list)  # the header of each 503
    not_sent: int = 0  # requests left when the deadline passed
    wall_s: float = 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    def count(self, status: int) -> int:
        return self.statuses.count(status)

    @property
    def errors(self) -> int:
        return sum(1 for s in self.statuses if s != 200) + self.not_sent


def run_load(
    url: str,
    path: str,
    body: Callable[[int], dict[str, object]],
    headers: dict[str, str],
    *,
    count: int,
    concurrency: int,
    deadline_s: float,
    timeout_s: float = 60.0,
) -> LoadResult:
    """POST `body(i)` to `url + path` for i < count from `concurrency` threads, all within `deadline_s`."""
    result = LoadResult()
    lock = threading.Lock()
    next_i = 0
    start = time.perf_counter()
    stop_at = start + deadline_s

    def worker() -> None:
        nonlocal next_i
        with httpx.Client(timeout=timeout_s) as http:
            while True:
                with lock:
                    if next_i >= count:
                        return
                    if time.perf_counter() > stop_at:
                        result.not_sent += 1
                        next_i += 1
                        continue
                    i = next_i
                    next_i += 1
                t0 = time.perf_counter()
                try:
                    resp = http.post(url + path, json=body(i), headers=headers)
                    status, after = resp.status_code, resp.headers.get("retry-after")
                except httpx.TransportError:
                    status, after = 0, None
                with lock:
                    result.latencies_s.append(time.perf_counter() - t0)
                    result.statuses.append(status)
                    if status == 503:
                        result.retry_after.append(after)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(deadline_s + timeout_s + 5.0)
    result.wall_s = time.perf_counter() - start
    return result
