"""Faults while document jobs run, against the app in a process of its own (tests/cluster/fault_app.py,
a random-weight Llama: fast to load again): the shard actor SIGKILLed mid-prefill, mid-decode and
mid-job, the engine replica SIGKILLed, and the whole process running the app SIGKILLed and started again
on the same SQLite job store. Every submitted job must end succeeded (retried) or failed with a reason,
none lost, none run twice to completion, results readable after the restart. The figure: submitted /
completed / failed / duplicated per fault. The policy actor killed (`ray.kill`, no restart) mid-job of
entropy jobs: the same, completions answered during the outage, and the shard links to a new actor. A
clean stop of the app while a job runs and a streamed completion decodes: the stream ends, the job finishes
after the restart.
(One rank of a tensor-parallel group killed: tests/cluster/test_faults_parallel.py.)
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from .app_process import AUTH, App

pytestmark = [pytest.mark.serve, pytest.mark.slow]

DOC_CHARS = 2500  # one token per byte (the random model's tokenizer): a prefill that takes a moment
ANSWER_TOKENS = 192  # each phase (prefill, decode) lasts past a few status polls, also under a loaded suite
# (64 was tried: a full run once saw a 3-document job finish before any poll caught its first decode)
QUEUED_TOKENS = 16  # the jobs queued behind a victim: they must not be lost, their phases do not matter
FIGURES: list[str] = []


def _doc(i: int, chars: int = DOC_CHARS) -> str:
    return (f"Record {i}: " + "the ledger lists crates of tea and copper; " * 80)[:chars]


def _submit(
    url: str, n_docs: int, tag: str, policy: str = "dense", chars: int = DOC_CHARS, tokens: int = 0
) -> str:
    """A job of `n_docs` documents answered with `tokens` tokens each (0: `ANSWER_TOKENS`)."""
    body = {
        "policy": policy,
        "documents": [_doc(i, chars) for i in range(n_docs)],
        "question": f"Summarise ({tag}).",
        "max_tokens": tokens or ANSWER_TOKENS,
        "ignore_eos": True,
        "idempotency_key": tag,
    }
    resp = httpx.post(url + "/v1/jobs", json=body, headers=AUTH, timeout=60)
    assert resp.status_code in (200, 201), resp.text
    return str(resp.json()["id"])


def _status(url: str, job_id: str) -> dict[str, Any]:
    resp = httpx.get(f"{url}/v1/jobs/{job_id}", headers=AUTH, timeout=30)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def _wait_for(
    url: str, job_id: str, cond: Callable[[dict[str, Any]], bool], timeout_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            job = _status(url, job_id)
        except httpx.TransportError:
            job = {}
        if job and (cond(job) or job["state"] in ("succeeded", "failed", "cancelled")):
            return job
        time.sleep(0.01)
    raise TimeoutError(f"{job_id}: condition not reached in {timeout_s:g}s")


def _outcome(url: str, job_ids: list[str], timeout_s: float = 150.0) -> dict[str, dict[str, Any]]:
    """Every job's final status and results (waits until all are finished: a lost job times out)."""
    out = {}
    for job_id in job_ids:
        job = _wait_for(url, job_id, lambda j: False, timeout_s)
        results = httpx.get(f"{url}/v1/jobs/{job_id}/results", headers=AUTH, timeout=30).json()
        out[job_id] = {**job, "results": results["results"]}
    return out


def _figure(fault: str, at: dict[str, Any], outcome: dict[str, dict[str, Any]], duplicated: int) -> None:
    states = [o["state"] for o in outcome.values()]
    failed = [o["error"] for o in outcome.values() if o["state"] == "failed"]
    p = at.get("progress", {})
    line = (
        f"{fault}: submitted {len(outcome)}, completed {states.count('succeeded')}, failed {len(failed)} "
        f"{failed}, duplicated {duplicated}, retried {sum(o['resumed'] for o in outcome.values())} "
        f"(killed at prefill {p.get('prefill_tokens_done')}/{p.get('prefill_tokens_total')} tokens, "
        f"documents {p.get('documents_done')}/{p.get('documents_total')})"
    )
    FIGURES.append(line)
    print(f"\nFIGURE fault {line}")
    assert set(states) <= {"succeeded", "failed"}
    assert all(err for err in failed)  # a failure says why
    for o in outcome.values():
        if o["state"] == "succeeded":
            assert len(o["results"]) == o["progress"]["documents_total"]
            assert all(r["text"] is not None and r["error"] is None for r in o["results"])
    assert duplicated == 0


PHASES: dict[str, Callable[[dict[str, Any]], bool]] = {
    # the first document is prefilling: the job runs, no prefill token is reported done yet
    "shard mid-prefill": lambda j: j["state"] == "running",
    # the first document's prefill is done and its answer is being decoded
    "shard mid-decode": lambda j: (
        j["progress"]["prefill_tokens_done"] > 0 and j["progress"]["documents_done"] == 0
    ),
    # one document answered, the next still to do
    "shard mid-job": lambda j: j["progress"]["documents_done"] >= 1,
    "engine replica mid-job": lambda j: j["progress"]["prefill_tokens_done"] > 0,
}


@pytest.mark.parametrize("fault", list(PHASES))
def test_a_killed_shard_or_replica_loses_no_job(app_process: App, fault: str) -> None:
    app, tag = app_process, fault.replace(" ", "-")
    others: list[str] = []
    for attempt in range(3):  # a loaded machine can answer no poll while the phase lasts: another job then
        victim = _submit(app.url, 3, f"{tag}-{attempt}")
        others.append(_submit(app.url, 1, f"{tag}-{attempt}-queued", tokens=QUEUED_TOKENS))  # behind it
        at = _wait_for(app.url, victim, PHASES[fault], 60.0)
        if at["state"] == "running":
            break
        others.append(victim)  # finished before the fault: it still must not be lost
    assert at["state"] == "running", at
    app.command("kill-replica" if "replica" in fault else "kill-shard")
    outcome = _outcome(app.url, [victim, *others])
    _figure(fault, at, outcome, duplicated=0)


def test_sigkill_of_the_whole_app_and_a_restart_on_the_same_store(app_process: App) -> None:
    app = app_process
    done = _submit(app.url, 1, "before-kill", tokens=QUEUED_TOKENS)
    finished_before = _outcome(app.url, [done])[done]
    victim = _submit(app.url, 3, "killed")
    queued = [_submit(app.url, 1, "queued", tokens=QUEUED_TOKENS)]
    at = _wait_for(app.url, victim, PHASES["shard mid-job"], 60.0)
    app.kill()
    app.start()  # the same job store
    outcome = _outcome(app.url, [done, victim, *queued])
    again = outcome[done]
    # A job finished before the kill is not run again: the same finish time and results.
    duplicated = int(again["finished_at"] != finished_before["finished_at"])
    duplicated += int(
        [r["text"] for r in again["results"]] != [r["text"] for r in finished_before["results"]]
    )
    # A resubmission under the same idempotency key after the restart returns the job, no second one.
    assert _submit(app.url, 3, "killed") == victim
    _figure("whole app SIGKILL + restart", at, outcome, duplicated)


def _policy(url: str) -> dict[str, Any]:
    resp = httpx.get(url + "/v1/policy/heads", headers=AUTH, timeout=30)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def _wait_policy(url: str, cond: Callable[[dict[str, Any]], bool], timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while not cond(heads := _policy(url)):
        assert time.monotonic() < deadline, heads
        time.sleep(0.1)
    return heads


def _link(heads: dict[str, Any]) -> dict[str, Any]:
    (link,) = heads["shards"]  # the one shard's link to the actor (`PolicyClient.stats`)
    return dict(link or {})


def test_a_killed_policy_actor_loses_no_job_and_no_request_waits_on_it(app_process: App) -> None:
    app, tag = app_process, "policy-actor"
    completion = {"prompt": "Record 7: the ledger", "max_tokens": 4, "policy": "entropy", "ignore_eos": True}
    victim = _submit(app.url, 3, tag, policy="entropy")
    others = [_submit(app.url, 1, f"{tag}-queued", policy="entropy", tokens=QUEUED_TOKENS)]
    at = _wait_for(app.url, victim, PHASES["shard mid-job"], 60.0)
    before = _wait_policy(app.url, lambda h: h["actor"]["state"] == "ok" and _link(h)["state"] == "ok", 30)
    app.command("kill-policy")
    # Completions while the actor is gone: answered, none waits on it (its calls run in the background)
    latencies = []
    down = False
    for _ in range(8):
        t0 = time.monotonic()
        resp = httpx.post(app.url + "/v1/completions", json=completion, headers=AUTH, timeout=60)
        latencies.append(time.monotonic() - t0)
        assert resp.status_code == 200, resp.text
        down = down or _link(_policy(app.url))["state"] == "unavailable"
    outcome = _outcome(app.url, [victim, *others])
    # the shard saw the outage (one failure at least) and linked to a new actor that answers
    after = _wait_policy(
        app.url,
        lambda h: (
            h["actor"]["state"] == "ok"
            and _link(h)["state"] == "ok"
            and _link(h)["failures"] > _link(before)["failures"]
        ),
        60,
    )
    print(
        f"\nFIGURE policy actor killed: link failures {_link(before)['failures']} -> "
        f"{_link(after)['failures']}, seen unavailable by a poll {down}; 8 entropy completions during "
        f"the outage all 200, slowest {max(latencies) * 1000:.0f} ms; new actor's table v"
        f"{after['table']['version'] if after['table'] else None}"
    )
    assert max(latencies) < 10.0
    _figure("policy actor killed mid-job", at, outcome, duplicated=0)


def test_a_clean_stop_mid_stream_and_mid_job_loses_nothing(app_process: App) -> None:
    """A clean shutdown (the app deleted, Ray stopped) while a job runs and a streamed completion with a
    deadline decodes: the stream ends by the time the app is down (no hang: the whole answer, an error
    event or a closed connection), and the job, handed back, finishes once after the restart."""
    app = app_process
    victim = _submit(app.url, 3, "clean-stop")
    at = _wait_for(app.url, victim, lambda j: j["progress"]["prefill_tokens_done"] > 0, 60.0)
    assert at["state"] == "running", at
    body = {"prompt": _doc(9)[:300], "max_tokens": 512, "ignore_eos": True, "stream": True, "timeout": 120}
    events: list[Any] = []
    ended: dict[str, Any] = {}
    first = threading.Event()

    def read() -> None:
        try:
            with httpx.stream("POST", app.url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
                ended["status"] = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        data = line[5:].strip()
                        events.append(data if data == "[DONE]" else json.loads(data))
                        first.set()
            ended["how"] = "[DONE]" if events and events[-1] == "[DONE]" else "closed"
        except httpx.HTTPError as e:  # the connection dropped under it
            ended["how"] = type(e).__name__
        ended["at"] = time.monotonic()
        first.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert first.wait(60) and ended.get("status", 200) == 200, ended
    t0 = time.monotonic()
    app.stop()
    stopped = time.monotonic() - t0
    reader.join(5.0)  # the stream has ended by the time the app is down (a hang would hold it open)
    assert not reader.is_alive(), f"the stream still open {stopped + 5:.0f}s after the stop began"
    chunks = [e["choices"][0] for e in events if isinstance(e, dict) and "choices" in e]
    errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
    how = f"an error event {errors[-1]['code']}" if errors else ended["how"]
    if ended["how"] == "[DONE]":  # a stream that ends normally ends with its finish reason: the whole answer
        assert chunks[-1]["finish_reason"] == "length", chunks[-3:]
        how = "the whole answer (finish_reason length, then [DONE])"
    app.start()  # the same job store
    outcome = _outcome(app.url, [victim])
    print(
        f"\nFIGURE clean stop mid-stream: the app was down {stopped:.1f}s after the stop began; the stream "
        f"in flight (deadline 120 s, max_tokens {body['max_tokens']}) ended with {how} ({len(chunks)} "
        f"chunks) {ended['at'] - t0:.1f}s after the stop began"
    )
    _figure("clean stop mid-job (and mid-stream)", at, outcome, duplicated=0)
    assert outcome[victim]["state"] == "succeeded"
