"""A clean shutdown in the middle of a job or of its cancel loses nothing (issue 14 item 5): the real
SQLite store, a job worker over a stand-in engine that speaks the typed events (no Ray)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from entropyinfer.cluster.job_store import JobStore
from entropyinfer.cluster.job_worker import JobWorker

from .test_jobs import FakeEngine, _job


def test_a_cancel_not_yet_seen_by_the_worker_survives_a_shutdown(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = store.submit(_job(["one", "two"]))
    other, _ = store.submit(_job(["three"]))
    assert store.claim("w-1") is not None and store.claim("w-1") is not None  # both running under w-1
    store.cancel(job.id)  # flagged for the worker, which stops before it sees the flag
    assert store.release("w-1") == 1  # only the job without a cancel goes back to the queue
    cancelled, queued = store.get(job.id), store.get(other.id)
    assert cancelled is not None and cancelled.state == "cancelled" and cancelled.finished_at is not None
    assert queued is not None and queued.state == "queued" and queued.worker is None
    store.close()

    reopened = JobStore(tmp_path / "jobs.sqlite")  # the app starts again on the same store
    claimed = reopened.claim("w-2")
    assert claimed is not None and claimed.id == other.id  # the cancelled job is not run again
    assert reopened.claim("w-2") is None
    reopened.close()


def test_a_shutdown_mid_job_hands_it_back_and_the_next_worker_finishes_it_once(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = store.submit(_job(["alpha doc", "beta doc", "gamma doc"]))
    engine = FakeEngine(delay=0.05)
    first = JobWorker(store, engine, system_prompt="sys", progress_interval_s=0.0, poll_s=0.05)

    async def stop_midway() -> int:
        loop = asyncio.create_task(first.run_forever())
        while not store.results(job.id):  # the first document is answered, the second under way
            await asyncio.sleep(0.01)
        return await first.shutdown(loop)

    assert asyncio.run(stop_midway()) == 1
    back = store.get(job.id)
    assert back is not None and back.state == "queued" and back.lost_count == 0
    done_before = [r["text"] for r in store.results(job.id)]
    assert 1 <= len(done_before) < 3

    second = JobWorker(store, engine, system_prompt="sys", progress_interval_s=0.0, poll_s=0.05)
    claimed = store.claim(second.worker_id)
    assert claimed is not None
    assert asyncio.run(second.process(claimed)) == "succeeded"
    assert [r["text"] for r in store.results(job.id)] == ["alpha", "beta", "gamma"]
    asked = [c.split("\n")[0] for c in engine.calls]
    assert asked.count("alpha doc") == 1 and asked.count("gamma doc") == 1  # none finished runs twice
    store.close()
