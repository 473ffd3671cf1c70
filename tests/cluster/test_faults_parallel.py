"""One rank of a tensor-parallel group SIGKILLed while document jobs and a completion run on it: the app in
a process of its own (tests/cluster/fault_app.py) deploys a second app at /tp, the same random-weight
Llama as a TP=2 group on CPU (gloo; rank 0 in the shard actor, rank 1 a `RayRanks` actor). A streamed
completion in flight ends within seconds with a 503 error event naming the rank, the shard actor rebuilds
the group, the next request succeeds, and every job ends succeeded (retried) or failed with a reason,
none lost. The same for rank 1 of a sequence-parallel group (/sp, SP=2) mid-job. The figure: submitted /
completed / failed / duplicated, as for the other faults (tests/cluster/test_faults.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .app_process import AUTH, App
from .test_faults import QUEUED_TOKENS, _figure, _outcome, _submit, _wait_for

pytestmark = [pytest.mark.serve, pytest.mark.slow]

LONG = {"prompt": "Record 1: the ledger lists", "max_tokens": 500, "ignore_eos": True, "temperature": 0}


def _group_app(app: App, name: str) -> Iterator[str]:
    """The URL of a parallel group's app beside the fault app's own (fault_app.py `deploy-<name>`),
    deleted after the test: one group at a time, so `kill-rank` knows its victim."""
    app.command(f"deploy-{name}", timeout_s=240.0)
    try:
        yield app.url + f"/{name}"
    finally:
        app.command(f"delete-{name}", timeout_s=120.0)


@pytest.fixture
def tp(app_process: App) -> Iterator[str]:
    yield from _group_app(app_process, "tp")


@pytest.fixture
def sp(app_process: App) -> Iterator[str]:
    yield from _group_app(app_process, "sp")


def _group(url: str) -> dict[str, Any]:
    resp = httpx.get(url + "/healthz", timeout=30)
    assert resp.status_code == 200, resp.text
    return dict(resp.json()["engine"]["group"])


def test_a_killed_rank_fails_the_request_in_flight_and_loses_no_job(app_process: App, tp: str) -> None:
    group = _group(tp)
    assert group["tensor_parallel_size"] == 2 and group["state"] == "ok", group
    victim = _submit(tp, 2, "tp-rank")  # fewer documents than test_faults.py's: a TP=2 step is slower
    others = [_submit(tp, 1, "tp-rank-queued", tokens=QUEUED_TOKENS)]
    at = _wait_for(tp, victim, lambda j: j["progress"]["prefill_tokens_done"] > 0, 60.0)
    assert at["state"] == "running", at
    # a streamed completion in flight: the rank is killed after its first token
    events: list[Any] = []
    t0 = 0.0
    body = {**LONG, "stream": True}
    with httpx.stream("POST", tp + "/v1/completions", json=body, headers=AUTH, timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data:"):
                data = line[5:].strip()
                events.append(data if data == "[DONE]" else json.loads(data))
                if len(events) == 1:
                    app_process.command("kill-rank")
                    t0 = time.monotonic()
    failed_after = time.monotonic() - t0
    assert events and "[DONE]" not in events, events[-3:]
    error = events[-1]["error"]
    tokens = len(events) - 1
    assert error["code"] == 503 and error["type"] == "unavailable" and "rank 1" in error["message"], error
    assert tokens < LONG["max_tokens"] and failed_after < 10.0
    deadline = time.monotonic() + 120
    while (group := _group(tp))["state"] != "ok" or group["rebuilds"] < 1:
        assert time.monotonic() < deadline, group
        time.sleep(0.2)
    rebuilt_after = time.monotonic() - t0
    assert group["failed_ranks"] == [1] and "rank 1" in (group["last_failure"] or ""), group
    again = httpx.post(tp + "/v1/completions", json={**LONG, "max_tokens": 8}, headers=AUTH, timeout=60)
    assert again.status_code == 200, again.text
    outcome = _outcome(tp, [victim, *others])
    print(
        f"\nFIGURE tensor-parallel rank 1 SIGKILLed: the stream in flight ended after {tokens} tokens "
        f"with a 503 error event {failed_after:.2f}s after the kill ({error['message'][:120]!r}); group "
        f"rebuilt {rebuilt_after:.1f}s after the kill (rebuilds {group['rebuilds']}); the next completion 200"
    )
    assert outcome[victim]["resumed"] >= 1  # the victim's engine failed under it: handed back, retried
    _figure("tensor-parallel rank 1 mid-job", at, outcome, duplicated=0)


def test_a_killed_sequence_parallel_rank_loses_no_job(app_process: App, sp: str) -> None:
    """The same fault for an SP=2 group: its document (1200 tokens, over the app's 512-token threshold) is
    prefilled in two segments, one on each rank; rank 1 is killed mid-job, a second job queued behind."""
    group = _group(sp)
    assert (group["sequence_parallel_size"], group["tensor_parallel_size"], group["state"]) == (2, 1, "ok")
    victim = _submit(sp, 1, "sp-rank", chars=1200)
    others = [_submit(sp, 1, "sp-rank-queued", chars=1200, tokens=QUEUED_TOKENS)]
    at = _wait_for(sp, victim, lambda j: j["progress"]["prefill_tokens_done"] > 0, 60.0)
    assert at["state"] == "running", at
    app_process.command("kill-rank")
    t0 = time.monotonic()
    deadline = t0 + 120
    while (group := _group(sp))["state"] != "ok" or group["rebuilds"] < 1:
        assert time.monotonic() < deadline, group
        time.sleep(0.2)
    rebuilt_after = time.monotonic() - t0
    assert group["failed_ranks"] == [1], group
    outcome = _outcome(sp, [victim, *others])
    print(
        f"\nFIGURE sequence-parallel rank 1 SIGKILLed mid-job: group rebuilt {rebuilt_after:.1f}s after "
        "the kill"
    )
    assert outcome[victim]["resumed"] >= 1  # the victim's engine failed under it: handed back, retried
    _figure("sequence-parallel rank 1 mid-job", at, outcome, duplicated=0)
