"""The SQLite job store and the job worker, with a fake engine speaking the typed events (no Ray)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from entropyinfer.cluster.events import Error, Event, Final, Progress, Request
from entropyinfer.cluster.job_store import JobStore
from entropyinfer.cluster.job_types import IdempotencyConflict, Job, NewDocument, NewJob
from entropyinfer.cluster.job_worker import JobWorker
from entropyinfer.shard.sampling import SamplingParams


def _job(texts: list[str], questions: tuple[str, ...] = ("q?",), tokens: int = 10) -> NewJob:
    docs = tuple(NewDocument(t, f"d{i}", tuple(tokens for _ in questions)) for i, t in enumerate(texts))
    return NewJob(docs, questions, {"sampling": SamplingParams(max_tokens=4).to_dict(), "policy": "dense"})


class FakeEngine:
    """Answers with the document's first word; prefill progress in 3 steps of `delay` seconds."""

    def __init__(self, delay: float = 0.0, fail_on: str | None = None, reject_on: str | None = None) -> None:
        self.delay = delay
        self.fail_on = fail_on
        self.reject_on = reject_on
        self.calls: list[str] = []
        self.requests: list[Request] = []
        self.closed_early = 0

    async def run(self, request: Request) -> AsyncIterator[Event]:
        assert isinstance(request.prompt, list)
        text = request.prompt[-1]["content"]
        self.calls.append(text)
        self.requests.append(request)
        if self.fail_on and self.fail_on in text:
            raise RuntimeError("engine exploded")
        if self.reject_on and self.reject_on in text:
            yield Error("prompt_too_long", "prompt too long")
            return
        finished = False
        try:
            for i in range(1, 4):
                await asyncio.sleep(self.delay)
                yield Progress(3 * i, 9)
            finished = True
            yield Final(text.split()[0], "stop", 1, 9, {"policy": request.policy})
        finally:
            if not finished:
                self.closed_early += 1


def _worker(store: JobStore, engine: FakeEngine, **kw: Any) -> JobWorker:
    kw.setdefault("progress_interval_s", 0.0)
    kw.setdefault("poll_s", 0.05)
    return JobWorker(store, engine, system_prompt="sys", **kw)


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    s = JobStore(tmp_path / "jobs.sqlite")
    yield s
    s.close()


def test_job_runs_to_completion_with_progress(store: JobStore) -> None:
    job, created = store.submit(_job(["alpha one", "beta two"], ("q1", "q2")))
    assert created and job.state == "queued" and job.prefill_total == 40 and job.n_documents == 2
    worker = _worker(store, FakeEngine())
    claimed = store.claim(worker.worker_id)
    assert claimed is not None and claimed.id == job.id and store.claim("other") is None
    assert asyncio.run(worker.process(claimed)) == "succeeded"
    done = store.get(job.id)
    assert done is not None and done.state == "succeeded"
    assert (done.documents_done, done.prefill_done) == (2, 40)
    results = store.results(job.id)
    assert [(r["document_index"], r["question_index"], r["text"]) for r in results] == [
        (0, 0, "alpha"),
        (0, 1, "alpha"),
        (1, 0, "beta"),
        (1, 1, "beta"),
    ]
    assert results[0]["document_name"] == "d0" and results[0]["stats"] == {"policy": "dense"}
    assert done.to_dict()["progress"]["documents_total"] == 2


def test_each_task_is_one_typed_request_with_the_jobs_sampling(store: JobStore) -> None:
    job, _ = store.submit(_job(["alpha one", "beta two"], ("q1", "q2")))
    engine = FakeEngine()
    worker = _worker(store, engine)
    claimed = store.claim(worker.worker_id)
    assert claimed is not None and asyncio.run(worker.process(claimed)) == "succeeded"
    assert [r.sampling for r in engine.requests] == [SamplingParams(max_tokens=4)] * 4
    assert {r.policy for r in engine.requests} == {"dense"} and not any(r.stream for r in engine.requests)
    assert len({r.request_id for r in engine.requests}) == 4  # each task its own (cancellable) request
    assert all(r.request_id.startswith(job.id + "/") for r in engine.requests)
    assert engine.requests[1].prompt == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "alpha one\n\nQuestion: q2"},
    ]


def test_a_job_whose_stored_sampling_is_invalid_fails_naming_it(store: JobStore) -> None:
    docs = (NewDocument("text", None, (3,)),)
    job, _ = store.submit(NewJob(docs, ("q?",), {"sampling": {"temperature": 9.0}, "policy": None}))
    engine = FakeEngine()
    worker = _worker(store, engine)
    claimed = store.claim(worker.worker_id)
    assert claimed is not None and asyncio.run(worker.process(claimed)) == "failed"
    failed = store.get(job.id)
    assert failed is not None and "temperature" in (failed.error or "") and engine.calls == []


def test_counting_prompts_give_every_tasks_token_count() -> None:
    """The ingress counts each document once and each question once; the sum minus the bare template is
    the (document, question) prompt's count."""
    worker = JobWorker(JobStore(":memory:"), FakeEngine(), system_prompt="sys")
    prompts = worker.counting_prompts(["doc a", "doc b"], ["q1", "q2", "q3"])
    assert len(prompts) == 2 + 3 + 1 and prompts[-1] == worker.prompt("", "")
    counts = [100, 200, 7, 8, 9, 5]  # doc a, doc b, q1..q3, template
    assert JobWorker.task_tokens(counts, 2) == [(102, 103, 104), (202, 203, 204)]


def test_job_survives_reopening_the_file(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "j.sqlite")
    job, _ = store.submit(_job(["gamma"]))
    worker = _worker(store, FakeEngine())
    claimed = store.claim(worker.worker_id)
    assert claimed is not None
    asyncio.run(worker.process(claimed))
    store.close()
    again = JobStore(tmp_path / "j.sqlite")
    got = again.get(job.id)
    assert got is not None and got.state == "succeeded"
    assert again.results(job.id)[0]["text"] == "gamma"
    again.close()


def test_idempotency_key(store: JobStore) -> None:
    first, created = store.submit(_job(["a"]), "key-1")
    second, created2 = store.submit(_job(["a"]), "key-1")
    assert created and not created2 and first.id == second.id
    with pytest.raises(IdempotencyConflict):
        store.submit(_job(["different"]), "key-1")
    third, created3 = store.submit(_job(["a"]), "key-2")
    assert created3 and third.id != first.id


def test_cancel_queued_and_running(store: JobStore) -> None:
    queued, _ = store.submit(_job(["x"]))
    cancelled = store.cancel(queued.id)
    assert cancelled is not None and cancelled.state == "cancelled"
    assert store.cancel("job-unknown") is None

    running, _ = store.submit(_job(["first doc", "second doc"]))
    engine = FakeEngine(delay=0.05)
    worker = _worker(store, engine)

    async def scenario() -> str:
        claimed = store.claim(worker.worker_id)
        assert claimed is not None
        task = asyncio.create_task(worker.process(claimed))
        await asyncio.sleep(0.08)  # inside the first document's prefill
        store.cancel(running.id)
        return await task

    assert asyncio.run(scenario()) == "cancelled"
    job = store.get(running.id)
    assert job is not None and job.state == "cancelled" and job.documents_done == 0
    assert engine.closed_early == 1 and len(engine.calls) == 1


def test_lost_job_resumes_then_fails(store: JobStore) -> None:
    job, _ = store.submit(_job(["one", "two", "three"]))
    engine = FakeEngine()
    worker = _worker(store, engine)
    claimed = store.claim("dead-worker")
    assert claimed is not None
    task = store.pending_tasks(job.id)[0]
    store.record_result(task, text="one", finish_reason="stop", stats={})  # it finished one document
    time.sleep(0.02)
    assert store.recover(lease_s=0.01, max_attempts=3) == (1, 0)
    resumed = store.get(job.id)
    assert resumed is not None and resumed.state == "queued" and resumed.lost_count == 1
    claimed = store.claim(worker.worker_id)
    assert claimed is not None
    assert asyncio.run(worker.process(claimed)) == "succeeded"
    assert len(engine.calls) == 2  # the finished document is not run again
    assert [r["text"] for r in store.results(job.id)] == ["one", "two", "three"]

    lost, _ = store.submit(_job(["four"]))
    for _ in range(2):
        assert store.claim("dead") is not None
        time.sleep(0.02)
        store.recover(lease_s=0.01, max_attempts=2)
    failed = store.get(lost.id)
    assert failed is not None and failed.state == "failed" and "lost 2 times" in (failed.error or "")


def test_release_on_clean_stop(store: JobStore) -> None:
    job, _ = store.submit(_job(["x"]))
    worker = _worker(store, FakeEngine())
    assert store.claim(worker.worker_id) is not None
    assert worker.stop() == 1
    back = store.get(job.id)
    assert back is not None and back.state == "queued" and back.lost_count == 0


def test_task_rejection_is_recorded_and_engine_failure_fails_the_job(store: JobStore) -> None:
    job, _ = store.submit(_job(["fine", "toolong doc", "fine again"]))
    worker = _worker(store, FakeEngine(reject_on="toolong"))
    claimed = store.claim(worker.worker_id)
    assert claimed is not None
    assert asyncio.run(worker.process(claimed)) == "succeeded"
    results = store.results(job.id)
    assert (
        results[1]["error"] == "prompt_too_long: prompt too long" and results[1]["finish_reason"] == "error"
    )
    assert results[2]["text"] == "fine"

    bad, _ = store.submit(_job(["ok", "boom"]))
    worker = _worker(store, FakeEngine(fail_on="boom"))
    claimed = store.claim(worker.worker_id)
    assert claimed is not None
    assert asyncio.run(worker.process(claimed)) == "failed"
    got = store.get(bad.id)
    assert got is not None and "engine exploded" in (got.error or "") and got.documents_done == 1


def test_worker_loop_picks_up_submissions_and_expires(store: JobStore) -> None:
    worker = _worker(store, FakeEngine())

    async def scenario() -> None:
        loop = asyncio.create_task(worker.run_forever(concurrency=2))
        ids = [store.submit(_job([f"doc{i}"]))[0].id for i in range(3)]
        worker.notify()
        for _ in range(200):
            states = [store.get(i).state for i in ids]  # type: ignore[union-attr]
            if all(s == "succeeded" for s in states):
                break
            await asyncio.sleep(0.02)
        assert states == ["succeeded"] * 3
        loop.cancel()

    asyncio.run(scenario())
    assert store.queue_length() == 0
    assert store.expire(ttl_s=-1.0) == 3
    assert store.results("anything") == []


# ---- engine outages, leases, several loops, shutdown ---------------------------------------------------


class EngineDown(Exception):
    """Stands for RayActorError / DeploymentUnavailableError: what the ingress maps to a 503."""


class FlakyEngine(FakeEngine):
    """Unavailable for the first `down` requests."""

    def __init__(self, down: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.down = down

    async def run(self, request: Request) -> AsyncIterator[Event]:
        if self.down > 0:
            self.down -= 1
            self.calls.append(str(request.prompt))
            raise EngineDown("engine replica restarting")
        async for ev in super().run(request):
            yield ev


class StalledEngine(FakeEngine):
    """Sends nothing for `stall` seconds (queued behind other requests), then answers."""

    def __init__(self, stall: float) -> None:
        super().__init__()
        self.stall = stall

    async def run(self, request: Request) -> AsyncIterator[Event]:
        self.calls.append(str(request.prompt))
        finished = False
        try:
            await asyncio.sleep(self.stall)
            finished = True
            yield Final("late", "stop", 1, 9)
        finally:
            if not finished:
                self.closed_early += 1


def _transient_worker(store: JobStore, engine: FakeEngine, **kw: Any) -> JobWorker:
    return _worker(store, engine, transient=lambda e: isinstance(e, EngineDown), **kw)


def test_engine_outage_requeues_the_job_then_fails_at_the_attempt_limit(store: JobStore) -> None:
    job, _ = store.submit(_job(["one", "two"]))
    engine = FlakyEngine(down=1)
    worker = _transient_worker(store, engine, max_attempts=3, retry_backoff_s=0.0)
    claimed = store.claim(worker.worker_id)
    assert claimed is not None
    assert asyncio.run(worker.process(claimed)) == "queued"  # not failed
    back = store.get(job.id)
    assert back is not None and back.state == "queued" and back.lost_count == 1 and back.error is None
    claimed = store.claim(worker.worker_id)
    assert claimed is not None and asyncio.run(worker.process(claimed)) == "succeeded"
    assert [r["text"] for r in store.results(job.id)] == ["one", "two"]

    down, _ = store.submit(_job(["three", "four"]))
    engine = FlakyEngine(down=10)
    worker = _transient_worker(store, engine, max_attempts=3, retry_backoff_s=0.0)
    states = []
    for _ in range(3):
        claimed = store.claim(worker.worker_id)
        assert claimed is not None
        states.append(asyncio.run(worker.process(claimed)))
    assert states == ["queued", "queued", "failed"]
    failed = store.get(down.id)
    assert failed is not None and failed.state == "failed" and failed.lost_count == 3
    error = failed.error or ""
    assert "unavailable 3 times" in error and "engine replica restarting" in error


async def _finished(store: JobStore, job_id: str, timeout_s: float = 30.0) -> Job | None:
    """The job once it is finished (polled every 10 ms), or as last seen after `timeout_s` (slow CI)."""
    deadline = time.monotonic() + timeout_s
    job = store.get(job_id)
    while (job is None or not job.finished) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        job = store.get(job_id)
    return job


def test_worker_loop_rides_out_an_engine_outage_with_backoff(store: JobStore) -> None:
    engine = FlakyEngine(down=2)
    worker = _transient_worker(store, engine, max_attempts=3, retry_backoff_s=0.05)
    done: list[str] = []
    worker.on_job_done = done.append

    async def scenario() -> None:
        loop = asyncio.create_task(worker.run_forever())
        job_id = store.submit(_job(["alpha"]))[0].id
        worker.notify()
        t0 = time.monotonic()
        job = await _finished(store, job_id)
        await worker.shutdown(loop)
        assert job is not None and job.state == "succeeded" and job.lost_count == 2
        assert time.monotonic() - t0 >= 0.05 + 0.1  # it waited 0.05 s, then 0.1 s, before retrying

    asyncio.run(scenario())
    assert done == ["succeeded"]  # only terminal states are counted as finished jobs


def test_timer_heartbeat_keeps_a_slow_job_from_running_twice(store: JobStore) -> None:
    """No engine event for longer than the lease: the timer keeps the lease, and the other loop (its own
    worker id) neither recovers nor re-runs the job."""
    engine = StalledEngine(stall=0.8)
    worker = _worker(store, engine, lease_s=0.2, poll_s=0.02)

    async def scenario() -> None:
        loop = asyncio.create_task(worker.run_forever(concurrency=2))
        job_id = store.submit(_job(["slow doc"]))[0].id
        worker.notify()
        job = await _finished(store, job_id)
        await worker.shutdown(loop)
        assert job is not None and job.state == "succeeded" and job.lost_count == 0

    asyncio.run(scenario())
    assert len(engine.calls) == 1


def test_each_worker_loop_claims_under_its_own_id(store: JobStore) -> None:
    ids = [store.submit(_job([f"doc{i}"]))[0].id for i in range(2)]
    engine = StalledEngine(stall=0.3)
    worker = _worker(store, engine)

    async def scenario() -> set[str]:
        loop = asyncio.create_task(worker.run_forever(concurrency=2))
        owners: set[str] = set()
        for _ in range(100):
            jobs = [store.get(i) for i in ids]
            owners |= {j.worker for j in jobs if j is not None and j.state == "running" and j.worker}
            if len(owners) == 2:
                break
            await asyncio.sleep(0.01)
        await worker.shutdown(loop)
        return owners

    owners = asyncio.run(scenario())
    assert len(owners) == 2 and all(o.startswith(worker.worker_id + "/") for o in owners)
    assert all(store.get(i).state == "queued" for i in ids)  # type: ignore[union-attr]


def test_cancel_seen_by_the_heartbeat_timer_stops_a_silent_request(store: JobStore) -> None:
    job, _ = store.submit(_job(["silent"]))
    engine = StalledEngine(stall=30.0)
    worker = _worker(store, engine, heartbeat_s=0.05)

    async def scenario() -> str:
        claimed = store.claim(worker.worker_id)
        assert claimed is not None
        task = asyncio.create_task(worker.process(claimed))
        await asyncio.sleep(0.1)
        store.cancel(job.id)
        return await asyncio.wait_for(task, 5.0)

    assert asyncio.run(scenario()) == "cancelled"
    assert engine.closed_early == 1


class SlowClaimStore(JobStore):
    """A claim that takes a while in its thread (a busy disk): the shutdown race."""

    def claim(self, worker: str, accept: Any = None) -> Any:
        time.sleep(0.3)
        return super().claim(worker, accept)


def test_shutdown_stops_the_loops_before_handing_jobs_back(tmp_path: Path) -> None:
    store = SlowClaimStore(tmp_path / "jobs.sqlite")
    worker = _worker(store, FakeEngine())

    async def scenario() -> tuple[int, str]:
        loop = asyncio.create_task(worker.run_forever())
        await asyncio.sleep(0.05)  # the loop is inside its claim
        job_id = store.submit(_job(["arrives during shutdown"]))[0].id
        released = await worker.shutdown(loop)
        await asyncio.sleep(0.5)  # the claim thread has finished by now
        return released, job_id

    released, job_id = asyncio.run(scenario())
    assert released == 0 and store.queue_length() == 1
    job = store.get(job_id)
    assert job is not None and (job.state, job.worker) == ("queued", None)  # not stranded as running
    store.close()


def test_pending_tasks_share_one_copy_of_each_document(store: JobStore) -> None:
    job, _ = store.submit(_job(["first document", "second document"], ("q1", "q2", "q3")))
    assert store.pending_documents(job.id) == [0, 1]
    tasks = store.pending_tasks(job.id)
    assert len(tasks) == 6 and len({id(t.document) for t in tasks}) == 2
    one = store.pending_tasks(job.id, 1)
    assert [(t.doc_idx, t.q_idx) for t in one] == [(1, 0), (1, 1), (1, 2)]
    store.record_result(one[0], text="x", finish_reason="stop", stats={})
    assert [t.q_idx for t in store.pending_tasks(job.id, 1)] == [1, 2]


def test_two_stores_on_one_file_run_each_job_once(tmp_path: Path) -> None:
    """Two ingress replicas on the head node: two connections, two workers, one file."""
    path = tmp_path / "shared.sqlite"
    stores = [JobStore(path), JobStore(path)]
    engines = [FakeEngine(delay=0.01), FakeEngine(delay=0.01)]
    workers = [_worker(s, e, lease_s=5.0) for s, e in zip(stores, engines, strict=True)]
    ids = [stores[0].submit(_job([f"doc{i} text"]))[0].id for i in range(8)]

    async def scenario() -> None:
        loops = [asyncio.create_task(w.run_forever(concurrency=2)) for w in workers]
        for w in workers:
            w.notify()
        for _ in range(500):
            if all(stores[1].get(i).finished for i in ids):  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.01)
        for w, loop in zip(workers, loops, strict=True):
            await w.shutdown(loop)

    asyncio.run(scenario())
    assert all(stores[0].get(i).state == "succeeded" for i in ids)  # type: ignore[union-attr]
    assert len(engines[0].calls) + len(engines[1].calls) == 8
    for s in stores:
        s.close()


# ---- a document's questions run together ------------------------------------------------------------


class CountingEngine(FakeEngine):
    """A FakeEngine that records how many requests were inside it at once."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.inside = 0
        self.most = 0

    async def run(self, request: Request) -> AsyncIterator[Event]:
        self.inside += 1
        self.most = max(self.most, self.inside)
        try:
            async for ev in super().run(request):
                yield ev
        finally:
            self.inside -= 1


def test_a_documents_questions_go_to_the_engine_together(store: JobStore) -> None:
    """All questions of one document are in the engine at once (so its prefix cache prefills the document
    once), documents one after another; every (document, question) result lands where it belongs."""
    job, _ = store.submit(_job(["alpha one", "beta two"], ("q1", "q2", "q3")))
    engine = CountingEngine(delay=0.02)
    worker = _worker(store, engine)
    claimed = store.claim(worker.worker_id)
    assert claimed is not None and asyncio.run(worker.process(claimed)) == "succeeded"
    assert engine.most == 3  # the three questions of a document, never the next document's
    results = store.results(job.id)
    assert [(r["document_index"], r["question_index"], r["text"]) for r in results] == [
        (d, q, word) for d, word in ((0, "alpha"), (1, "beta")) for q in range(3)
    ]
    prompts = [r.prompt[-1]["content"] for r in engine.requests]  # type: ignore[index]
    assert prompts[:3] == [f"alpha one\n\nQuestion: q{i}" for i in (1, 2, 3)]
    done = store.get(job.id)
    assert done is not None and (done.documents_done, done.prefill_done) == (2, 60)


def test_cancel_stops_every_question_in_flight(store: JobStore) -> None:
    job, _ = store.submit(_job(["first doc", "second doc"], ("q1", "q2", "q3")))
    engine = CountingEngine(delay=0.05)
    worker = _worker(store, engine)

    async def scenario() -> str:
        claimed = store.claim(worker.worker_id)
        assert claimed is not None
        task = asyncio.create_task(worker.process(claimed))
        await asyncio.sleep(0.08)  # inside the first document's prefill, its three questions in flight
        store.cancel(job.id)
        return await task

    assert asyncio.run(scenario()) == "cancelled"
    assert engine.closed_early == 3 and len(engine.calls) == 3 and engine.inside == 0
    assert store.results(job.id) == []


class _SiblingEngine(FakeEngine):
    """ "boom" fails after 30 ms, "slow" would answer after 5 s, anything else answers at once."""

    async def run(self, request: Request) -> AsyncIterator[Event]:
        text = request.prompt[-1]["content"]  # type: ignore[index]
        self.calls.append(text)
        if "boom" in text:
            await asyncio.sleep(0.03)
            raise RuntimeError("engine exploded")
        finished = False
        try:
            await asyncio.sleep(5.0 if "slow" in text else 0.0)
            finished = True
            yield Final(text.split()[0], "stop", 1, 9)
        finally:
            if not finished:
                self.closed_early += 1


def test_a_failing_question_fails_the_job_and_stops_its_siblings(store: JobStore) -> None:
    job, _ = store.submit(_job(["doc text"], ("fine", "boom", "slow")))
    engine = _SiblingEngine()
    worker = _worker(store, engine)
    claimed = store.claim(worker.worker_id)
    t0 = time.monotonic()
    assert claimed is not None and asyncio.run(worker.process(claimed)) == "failed"
    failed = store.get(job.id)
    assert failed is not None and "engine exploded" in (failed.error or "")
    assert engine.closed_early == 1 and time.monotonic() - t0 < 4.0  # the slow sibling was stopped
    assert [r["question_index"] for r in store.results(job.id)] == [0]  # the finished one is kept


class _HalfDown(FakeEngine):
    """Unavailable for the first request of question "q2" (after "q1" has answered)."""

    down = 1

    async def run(self, request: Request) -> AsyncIterator[Event]:
        if "q2" in request.prompt[-1]["content"] and self.down:  # type: ignore[index]
            self.down -= 1
            await asyncio.sleep(0.3)  # q1 finishes (and is recorded) first
            raise EngineDown("replica restarting")
        async for ev in super().run(request):
            yield ev


def test_an_outage_on_one_question_requeues_and_the_retry_skips_finished_ones(store: JobStore) -> None:
    job, _ = store.submit(_job(["doc text"], ("q1", "q2")))
    engine = _HalfDown()
    worker = _transient_worker(store, engine, retry_backoff_s=0.0)
    claimed = store.claim(worker.worker_id)
    assert claimed is not None and asyncio.run(worker.process(claimed)) == "queued"
    claimed = store.claim(worker.worker_id)
    assert claimed is not None and asyncio.run(worker.process(claimed)) == "succeeded"
    assert [r.prompt[-1]["content"][-2:] for r in engine.requests] == ["q1", "q2"]  # type: ignore[index]
    assert [r["text"] for r in store.results(job.id)] == ["doc", "doc"]
