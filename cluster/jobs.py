"""Document jobs: a SQLite store (jobs, documents, tasks with their results, idempotency keys) and the
worker that runs queued jobs through the engine, one (document, question) task at a time.

States: queued -> running -> succeeded | failed | cancelled. A job is a batch of documents and questions;
each (document, question) pair is a task whose prompt-token count is known at submission, so progress
is reported as prefill tokens done / total and documents done / total. Finished tasks are written as they
finish: a job that is resumed (after its worker was lost) skips them.

The store is plain synchronous sqlite3 (WAL, one connection guarded by a lock); it imports nothing from
Ray, so its tests need no cluster. Several processes on one host may share one file (ingress replicas,
or an old and a new replica during a redeploy): claiming a job is one `BEGIN IMMEDIATE` transaction and
every worker loop has its own id, so a job runs in one place; a running job is heartbeated on a timer.
The file must be on a local disk of that host (SQLite locking is not safe over network filesystems).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TERMINAL = ("succeeded", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    heartbeat_at REAL,
    worker TEXT,
    lost_count INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    params TEXT NOT NULL,
    n_documents INTEGER NOT NULL,
    n_questions INTEGER NOT NULL,
    prefill_total INTEGER NOT NULL,
    prefill_done INTEGER NOT NULL DEFAULT 0,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, created_at);
CREATE TABLE IF NOT EXISTS documents (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    name TEXT,
    text TEXT NOT NULL,
    PRIMARY KEY (job_id, idx)
);
CREATE TABLE IF NOT EXISTS tasks (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    doc_idx INTEGER NOT NULL,
    q_idx INTEGER NOT NULL,
    question TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    text TEXT,
    finish_reason TEXT,
    stats TEXT,
    error TEXT,
    PRIMARY KEY (job_id, doc_idx, q_idx)
);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    request_hash TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""


class IdempotencyConflict(Exception):
    """The idempotency key was used before for a different request."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(f"idempotency key {key!r} was already used for a different request (job {job_id})")
        self.key = key
        self.job_id = job_id


@dataclass(frozen=True)
class NewDocument:
    text: str
    name: str | None
    prompt_tokens: tuple[int, ...]  # one per question, as the engine counts them


@dataclass(frozen=True)
class NewJob:
    documents: tuple[NewDocument, ...]
    questions: tuple[str, ...]
    params: dict[str, Any]  # sampling parameters and policy: {"sampling": {...}, "policy": str | None}

    def request_hash(self) -> str:
        return request_digest([(d.name, d.text) for d in self.documents], self.questions, self.params)


def request_digest(
    documents: Sequence[tuple[str | None, str]], questions: Sequence[str], params: dict[str, Any]
) -> str:
    """What makes two submissions the same request (for idempotency keys)."""
    h = hashlib.sha256()
    h.update(json.dumps([list(questions), params], sort_keys=True).encode())
    for name, text in documents:
        h.update(b"\0doc\0" + (name or "").encode() + b"\0" + text.encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Job:
    id: str
    state: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    n_documents: int
    n_questions: int
    documents_done: int
    prefill_total: int
    prefill_done: int
    cancel_requested: bool
    lost_count: int
    error: str | None
    params: dict[str, Any] = field(repr=False)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "job",
            "state": self.state,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "error": self.error,
            "progress": {
                "documents_done": self.documents_done,
                "documents_total": self.n_documents,
                "prefill_tokens_done": self.prefill_done,
                "prefill_tokens_total": self.prefill_total,
            },
            "questions": self.n_questions,
            "resumed": self.lost_count,
        }


@dataclass(frozen=True)
class Task:
    job_id: str
    doc_idx: int
    q_idx: int
    question: str
    prompt_tokens: int
    document: str


class JobStore:
    """SQLite-backed job store; every method is one short transaction and is thread-safe."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.execute("PRAGMA busy_timeout = 30000")
        if str(path) != ":memory:":
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.executescript(_SCHEMA)
        with self._tx():
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row["value"]) != SCHEMA_VERSION:
                raise RuntimeError(
                    f"job store {self.path} has schema version {row['value']}, this entropyinfer reads "
                    f"{SCHEMA_VERSION}: move the file away (jobs in it are lost) or use a matching version"
                )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ---- submission and reads -------------------------------------------------------------------

    def submit(self, job: NewJob, idempotency_key: str | None = None) -> tuple[Job, bool]:
        """Persist a new job (state queued); returns (job, created). A known key returns its job."""
        digest = job.request_hash()
        now = time.time()
        job_id = "job-" + uuid.uuid4().hex[:24]
        with self._tx() as db:
            if idempotency_key is not None:
                row = db.execute(
                    "SELECT job_id, request_hash FROM idempotency WHERE key = ?", (idempotency_key,)
                ).fetchone()
                if row is not None:
                    if row["request_hash"] != digest:
                        raise IdempotencyConflict(idempotency_key, row["job_id"])
                    existing = self._get(db, row["job_id"])
                    if existing is not None:
                        return existing, False
                    db.execute("DELETE FROM idempotency WHERE key = ?", (idempotency_key,))
            total = sum(sum(d.prompt_tokens) for d in job.documents)
            db.execute(
                "INSERT INTO jobs (id, state, created_at, params, n_documents, n_questions, prefill_total)"
                " VALUES (?, 'queued', ?, ?, ?, ?, ?)",
                (job_id, now, json.dumps(job.params), len(job.documents), len(job.questions), total),
            )
            db.executemany(
                "INSERT INTO documents (job_id, idx, name, text) VALUES (?, ?, ?, ?)",
                [(job_id, i, d.name, d.text) for i, d in enumerate(job.documents)],
            )
            db.executemany(
                "INSERT INTO tasks (job_id, doc_idx, q_idx, question, prompt_tokens) VALUES (?, ?, ?, ?, ?)",
                [
                    (job_id, i, q, question, d.prompt_tokens[q])
                    for i, d in enumerate(job.documents)
                    for q, question in enumerate(job.questions)
                ],
            )
            if idempotency_key is not None:
                db.execute(
                    "INSERT INTO idempotency (key, job_id, request_hash, created_at) VALUES (?, ?, ?, ?)",
                    (idempotency_key, job_id, digest, now),
                )
            created = self._get(db, job_id)
        assert created is not None
        return created, True

    def lookup_key(self, key: str, digest: str) -> Job | None:
        """The job an idempotency key names (None if unknown or expired); IdempotencyConflict when the
        key was used for a request with a different digest."""
        with self._lock:
            row = self._db.execute(
                "SELECT job_id, request_hash FROM idempotency WHERE key = ?", (key,)
            ).fetchone()
            if row is None:
                return None
            if row["request_hash"] != digest:
                raise IdempotencyConflict(key, row["job_id"])
            return self._get(self._db, row["job_id"])

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._get(self._db, job_id)

    def results(self, job_id: str) -> list[dict[str, Any]]:
        """Finished tasks of a job, in (document, question) order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT t.doc_idx, t.q_idx, t.question, t.prompt_tokens, t.text, t.finish_reason, t.stats,"
                " t.error, d.name FROM tasks t JOIN documents d ON d.job_id = t.job_id AND d.idx = t.doc_idx"
                " WHERE t.job_id = ? AND t.done = 1 ORDER BY t.doc_idx, t.q_idx",
                (job_id,),
            ).fetchall()
        return [
            {
                "document_index": r["doc_idx"],
                "document_name": r["name"],
                "question_index": r["q_idx"],
                "question": r["question"],
                "text": r["text"],
                "finish_reason": r["finish_reason"],
                "error": r["error"],
                "stats": json.loads(r["stats"]) if r["stats"] else {},
            }
            for r in rows
        ]

    def queue_length(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()[0])

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a job: a queued one at once, a running one by flagging it for its worker."""
        now = time.time()
        with self._tx() as db:
            job = self._get(db, job_id)
            if job is None or job.finished:
                return job
            if job.state == "queued":
                db.execute(
                    "UPDATE jobs SET state = 'cancelled', cancel_requested = 1, finished_at = ?,"
                    " error = 'cancelled by request' WHERE id = ?",
                    (now, job_id),
                )
            else:
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            return self._get(db, job_id)

    # ---- the worker's side ----------------------------------------------------------------------

    def claim(self, worker: str, accept: Callable[[], bool] | None = None) -> Job | None:
        """Take the oldest queued job for `worker` (state running), or None. `accept` is asked inside the
        transaction: a worker that is shutting down takes nothing, even with a claim already under way."""
        now = time.time()
        with self._tx() as db:
            if accept is not None and not accept():
                return None
            row = db.execute(
                "SELECT id FROM jobs WHERE state = 'queued' ORDER BY created_at LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'running', worker = ?, heartbeat_at = ?,"
                " started_at = COALESCE(started_at, ?) WHERE id = ?",
                (worker, now, now, row["id"]),
            )
            return self._get(db, row["id"])

    def pending_documents(self, job_id: str) -> list[int]:
        """Indices of the documents that still have unfinished tasks, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT doc_idx FROM tasks WHERE job_id = ? AND done = 0 ORDER BY doc_idx", (job_id,)
            ).fetchall()
        return [int(r[0]) for r in rows]

    def pending_tasks(self, job_id: str, doc_idx: int | None = None) -> list[Task]:
        """Unfinished tasks (of one document, or all); a document's tasks share one copy of its text."""
        where, args = ("AND doc_idx = ?", (job_id, doc_idx)) if doc_idx is not None else ("", (job_id,))
        with self._lock:
            rows = self._db.execute(
                "SELECT doc_idx, q_idx, question, prompt_tokens FROM tasks"
                f" WHERE job_id = ? AND done = 0 {where} ORDER BY doc_idx, q_idx",
                args,
            ).fetchall()
            texts: dict[int, str] = {}
            for r in rows:
                if r["doc_idx"] not in texts:
                    texts[r["doc_idx"]] = self._db.execute(
                        "SELECT text FROM documents WHERE job_id = ? AND idx = ?", (job_id, r["doc_idx"])
                    ).fetchone()[0]
        return [
            Task(job_id, r["doc_idx"], r["q_idx"], r["question"], r["prompt_tokens"], texts[r["doc_idx"]])
            for r in rows
        ]

    def heartbeat(self, job_id: str, worker: str, partial_prefill: int = 0) -> bool:
        """Record liveness and progress within the current task; returns True if the job should stop
        (cancel requested, or the job is no longer this worker's)."""
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT state, worker, cancel_requested FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if row is None or row["state"] != "running" or row["worker"] != worker:
                return True
            done = self._done_prefill(db, job_id)
            db.execute(
                "UPDATE jobs SET heartbeat_at = ?, prefill_done = ? WHERE id = ?",
                (now, done + partial_prefill, job_id),
            )
            return bool(row["cancel_requested"])

    def record_result(
        self,
        task: Task,
        *,
        text: str | None,
        finish_reason: str | None,
        stats: dict[str, Any] | None,
        error: str | None = None,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE tasks SET done = 1, text = ?, finish_reason = ?, stats = ?, error = ?"
                " WHERE job_id = ? AND doc_idx = ? AND q_idx = ?",
                (text, finish_reason, json.dumps(stats or {}), error, task.job_id, task.doc_idx, task.q_idx),
            )
            db.execute(
                "UPDATE jobs SET prefill_done = ?, heartbeat_at = ? WHERE id = ?",
                (self._done_prefill(db, task.job_id), time.time(), task.job_id),
            )

    def finish(self, job_id: str, worker: str, state: str, error: str | None = None) -> None:
        assert state in TERMINAL
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = ?, error = ?, finished_at = ?, worker = NULL"
                " WHERE id = ? AND worker = ? AND state = 'running'",
                (state, error, time.time(), job_id, worker),
            )

    def release(self, *workers: str) -> int:
        """Put these workers' running jobs back in the queue (a clean shutdown); returns how many."""
        with self._tx() as db:
            return sum(
                db.execute(
                    "UPDATE jobs SET state = 'queued', worker = NULL WHERE state = 'running' AND worker = ?",
                    (worker,),
                ).rowcount
                for worker in workers
            )

    def requeue(
        self, job_id: str, worker: str, max_attempts: int, reason: str
    ) -> tuple[Literal["queued", "failed", "cancelled"], int] | None:
        """The engine was unavailable while `worker` ran the job: queue it again (finished tasks stay
        done), counted in lost_count like a lost worker, or fail it at `max_attempts`. Returns (state,
        lost_count), or None when the job is no longer this worker's."""
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT lost_count, cancel_requested FROM jobs"
                " WHERE id = ? AND worker = ? AND state = 'running'",
                (job_id, worker),
            ).fetchone()
            if row is None:
                return None
            lost = row["lost_count"] + 1
            done = self._done_prefill(db, job_id)
            if row["cancel_requested"]:
                db.execute(
                    "UPDATE jobs SET state = 'cancelled', finished_at = ?, worker = NULL, lost_count = ?,"
                    " prefill_done = ?, error = 'cancelled by request' WHERE id = ?",
                    (now, lost, done, job_id),
                )
                return "cancelled", lost
            if lost >= max_attempts:
                db.execute(
                    "UPDATE jobs SET state = 'failed', finished_at = ?, worker = NULL, lost_count = ?,"
                    " prefill_done = ?, error = ? WHERE id = ?",
                    (now, lost, done, f"the engine was unavailable {lost} times ({reason}); gave up", job_id),
                )
                return "failed", lost
            db.execute(
                "UPDATE jobs SET state = 'queued', worker = NULL, lost_count = ?, prefill_done = ?"
                " WHERE id = ?",
                (lost, done, job_id),
            )
            return "queued", lost

    def recover(self, lease_s: float, max_attempts: int) -> tuple[int, int]:
        """Running jobs whose worker stopped heartbeating for `lease_s`: requeue them, or fail them once
        they were lost `max_attempts` times. Returns (requeued, failed)."""
        now = time.time()
        requeued = failed = 0
        with self._tx() as db:
            rows = db.execute(
                "SELECT id, lost_count, cancel_requested FROM jobs"
                " WHERE state = 'running' AND heartbeat_at < ?",
                (now - lease_s,),
            ).fetchall()
            for r in rows:
                lost = r["lost_count"] + 1
                if r["cancel_requested"]:
                    db.execute(
                        "UPDATE jobs SET state = 'cancelled', finished_at = ?, worker = NULL, lost_count = ?,"
                        " error = 'cancelled by request' WHERE id = ?",
                        (now, lost, r["id"]),
                    )
                elif lost >= max_attempts:
                    failed += 1
                    db.execute(
                        "UPDATE jobs SET state = 'failed', finished_at = ?, worker = NULL, lost_count = ?,"
                        " error = ? WHERE id = ?",
                        (
                            now,
                            lost,
                            f"the worker running this job was lost {lost} times (no heartbeat for "
                            f"{lease_s:g}s); giving up",
                            r["id"],
                        ),
                    )
                else:
                    requeued += 1
                    db.execute(
                        "UPDATE jobs SET state = 'queued', worker = NULL, lost_count = ? WHERE id = ?",
                        (lost, r["id"]),
                    )
        if requeued or failed:
            log.warning("job store: %d lost job(s) requeued, %d failed", requeued, failed)
        return requeued, failed

    def expire(self, ttl_s: float) -> int:
        """Delete jobs (documents, results, keys) finished more than `ttl_s` ago."""
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at < ?",
                (time.time() - ttl_s,),
            )
            return cur.rowcount

    # ---- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _done_prefill(db: sqlite3.Connection, job_id: str) -> int:
        row = db.execute(
            "SELECT COALESCE(SUM(prompt_tokens), 0) FROM tasks WHERE job_id = ? AND done = 1", (job_id,)
        ).fetchone()
        return int(row[0])

    @staticmethod
    def _get(db: sqlite3.Connection, job_id: str) -> Job | None:
        r = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if r is None:
            return None
        docs_done = db.execute(
            "SELECT COUNT(*) FROM (SELECT doc_idx FROM tasks WHERE job_id = ? GROUP BY doc_idx"
            " HAVING MIN(done) = 1)",
            (job_id,),
        ).fetchone()[0]
        return Job(
            id=r["id"],
            state=r["state"],
            created_at=r["created_at"],
            started_at=r["started_at"],
            finished_at=r["finished_at"],
            n_documents=r["n_documents"],
            n_questions=r["n_questions"],
            documents_done=int(docs_done),
            prefill_total=r["prefill_total"],
            prefill_done=r["prefill_done"],
            cancel_requested=bool(r["cancel_requested"]),
            lost_count=r["lost_count"],
            error=r["error"],
            params=json.loads(r["params"]),
        )


# ---- the worker ---------------------------------------------------------------------------------


class EngineRunner(Protocol):
    """What the worker needs from the engine: run one prompt, yielding events.

    Events are dicts: {"type": "progress", "done": int, "total": int} while prefilling, then
    {"type": "final", "text": str, "finish_reason": str, "stats": dict} last. A request that cannot
    be served raises (InvalidRequestError / PromptTooLongError are recorded on the task; an engine
    outage requeues the job; anything else fails the job). Leaving the iterator early must cancel the
    request in the engine.
    """

    def run(
        self, prompt: list[dict[str, str]], sampling: dict[str, Any], policy: str | None
    ) -> AsyncIterator[dict[str, Any]]: ...


class TaskError(Exception):
    """A task's request was rejected by the engine; the job goes on with its other tasks."""


@dataclass(frozen=True)
class _Outcome:
    """How one task ended: done (result or per-task error recorded), stop (cancel requested, or the job
    is no longer ours), retry (the engine was unavailable: requeue the job), fail (fail the job)."""

    kind: Literal["done", "stop", "retry", "fail"]
    message: str | None = None


class _Lease:
    """One claimed job in a worker loop: its heartbeat and the stop signal."""

    def __init__(self, job_id: str, worker: str) -> None:
        self.job_id = job_id
        self.worker = worker
        self.partial = 0  # prefill tokens of the task in progress
        self.stopped = asyncio.Event()  # cancel requested, or the job was taken away
        self.lock = asyncio.Lock()  # orders heartbeats and result writes of this job


class JobWorker:
    """Runs queued jobs: claims one, runs its pending tasks in order, writes each result, honours cancel.

    `classify(exc)` tells a task-level rejection (returns a message) from a failure of the job (None);
    `transient(exc)` marks an engine outage (the job is requeued, counted in lost_count, and the worker
    waits `retry_backoff_s`, doubled per attempt, before taking jobs again). Each loop of `run_forever`
    claims under its own id (`worker_id/<n>`), and a running job is heartbeated every `heartbeat_s`
    (default lease_s / 4) even while the engine sends nothing, so its lease never runs out while it runs.
    """

    def __init__(
        self,
        store: JobStore,
        engine: EngineRunner,
        *,
        lease_s: float = 60.0,
        max_attempts: int = 3,
        poll_s: float = 1.0,
        progress_interval_s: float = 0.25,
        result_ttl_s: float = 7 * 24 * 3600.0,
        system_prompt: str | None = None,
        prompt_template: str = "{document}\n\nQuestion: {question}",
        classify: Callable[[BaseException], str | None] = lambda e: None,
        transient: Callable[[BaseException], bool] = lambda e: False,
        retry_backoff_s: float = 10.0,
        heartbeat_s: float | None = None,
        on_task_done: Callable[[dict[str, Any]], None] = lambda stats: None,
        on_job_done: Callable[[str], None] = lambda state: None,
    ) -> None:
        self.store = store
        self.engine = engine
        self.worker_id = f"worker-{uuid.uuid4().hex[:12]}"
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.poll_s = poll_s
        self.progress_interval_s = progress_interval_s
        self.result_ttl_s = result_ttl_s
        self.system_prompt = system_prompt
        self.prompt_template = prompt_template
        self.classify = classify
        self.transient = transient
        self.retry_backoff_s = retry_backoff_s
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else lease_s / 4
        self.on_task_done = on_task_done
        self.on_job_done = on_job_done
        self._ids = {self.worker_id}  # every id this worker claims under (released on stop)
        self._wake = asyncio.Event()
        self._stopping = False
        self._paused_until = 0.0  # monotonic time: the engine was unavailable, take no job before

    def prompt(self, document: str, question: str) -> list[dict[str, str]]:
        return build_prompt(document, question, self.system_prompt, self.prompt_template)

    def notify(self) -> None:
        """A job was submitted: look at the queue now instead of at the next poll."""
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def run_forever(self, concurrency: int = 1) -> None:
        ids = [f"{self.worker_id}/{i}" for i in range(concurrency)]
        self._ids.update(ids)
        await asyncio.gather(*(self._loop(worker_id) for worker_id in ids))

    async def _loop(self, worker_id: str) -> None:
        last_sweep = 0.0
        while not self._stopping:
            try:
                if time.monotonic() - last_sweep > min(self.lease_s / 2, 30.0):
                    await asyncio.to_thread(self.store.recover, self.lease_s, self.max_attempts)
                    await asyncio.to_thread(self.store.expire, self.result_ttl_s)
                    last_sweep = time.monotonic()
                paused = self._paused_until - time.monotonic()
                if paused > 0:
                    await asyncio.sleep(min(paused, self.poll_s))
                    continue
                job = await asyncio.to_thread(self.store.claim, worker_id, self._accepting)
                if job is None:
                    self._wake.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.poll_s)
                    continue
                await self.process(job, worker_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job worker loop error; retrying")
                await asyncio.sleep(self.poll_s)

    def _accepting(self) -> bool:
        return not self._stopping

    def stop(self) -> int:
        """Stop taking jobs and hand running ones back to the queue. Prefer `shutdown`, which first
        stops the loops: a loop still running can claim a job after this returns."""
        self._stopping = True
        self._wake.set()
        return self.store.release(*self._ids)

    async def shutdown(self, runner: asyncio.Task[Any] | None = None, timeout: float = 30.0) -> int:
        """Clean shutdown: stop taking jobs, cancel `runner` (the `run_forever` task) and wait for it (the
        engine requests in flight are cancelled), then hand the running jobs back to the queue."""
        self._stopping = True
        self._wake.set()
        if runner is not None and not runner.done():
            runner.cancel()
            await asyncio.wait({runner}, timeout=timeout)
        return await asyncio.to_thread(self.store.release, *self._ids)

    async def process(self, job: Job, worker_id: str | None = None) -> str:
        """Run one job claimed by `worker_id` (default `self.worker_id`) to a terminal state, or until it
        is requeued or taken away; returns the job's state. `on_job_done` sees terminal states at once,
        before any await, so a shutdown racing the job's end cannot lose the count."""
        lease = _Lease(job.id, worker_id or self.worker_id)
        beat = asyncio.create_task(self._keep_alive(lease))
        try:
            state = await self._process(job, lease)
            if state in TERMINAL:
                self.on_job_done(state)
            return state
        finally:
            beat.cancel()
            await asyncio.wait({beat})

    async def _process(self, job: Job, lease: _Lease) -> str:
        sampling = job.params.get("sampling", {})
        policy = job.params.get("policy")
        # One document at a time: a job's documents are never all in memory at once.
        for doc_idx in await asyncio.to_thread(self.store.pending_documents, job.id):
            for task in await asyncio.to_thread(self.store.pending_tasks, job.id, doc_idx):
                if lease.stopped.is_set() or await self._heartbeat(lease):
                    return await self._stop_job(lease)
                outcome = await self._run_task(task, sampling, policy, lease)
                if outcome.kind == "stop":
                    return await self._stop_job(lease)
                if outcome.kind == "retry":
                    return await self._requeue(lease, outcome.message or "engine unavailable")
                if outcome.kind == "fail":
                    await asyncio.to_thread(
                        self.store.finish, job.id, lease.worker, "failed", outcome.message
                    )
                    return "failed"
        if await self._heartbeat(lease):
            return await self._stop_job(lease)
        await asyncio.to_thread(self.store.finish, job.id, lease.worker, "succeeded")
        return "succeeded"

    async def _heartbeat(self, lease: _Lease) -> bool:
        """Record liveness (and the current task's prefill progress); True: stop this job."""
        async with lease.lock:
            stop = await asyncio.to_thread(self.store.heartbeat, lease.job_id, lease.worker, lease.partial)
        if stop:
            lease.stopped.set()
        return stop

    async def _keep_alive(self, lease: _Lease) -> None:
        """Heartbeat on a timer while the job runs (the engine may send nothing for a long time: queued
        behind other requests, or a replica starting); a stop it sees interrupts the task in flight."""
        while not lease.stopped.is_set():
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self._heartbeat(lease)
            except Exception:
                log.exception("job %s: heartbeat failed", lease.job_id)

    async def _requeue(self, lease: _Lease, reason: str) -> str:
        requeued = await asyncio.to_thread(
            self.store.requeue, lease.job_id, lease.worker, self.max_attempts, reason
        )
        if requeued is None:
            job = await asyncio.to_thread(self.store.get, lease.job_id)
            return job.state if job is not None else "deleted"
        state, lost = requeued
        if state == "queued":
            backoff = min(self.lease_s, self.retry_backoff_s * 2 ** (lost - 1))
            self._paused_until = max(self._paused_until, time.monotonic() + backoff)
            log.warning(
                "job %s: engine unavailable (%s); requeued (attempt %d of %d), pausing %.1fs",
                lease.job_id,
                reason,
                lost,
                self.max_attempts,
                backoff,
            )
        return state

    async def _stop_job(self, lease: _Lease) -> str:
        job = await asyncio.to_thread(self.store.get, lease.job_id)
        if job is not None and job.state == "running" and job.cancel_requested:
            await asyncio.to_thread(
                self.store.finish, lease.job_id, lease.worker, "cancelled", "cancelled by request"
            )
            return "cancelled"
        return job.state if job is not None else "deleted"

    async def _run_task(
        self, task: Task, sampling: dict[str, Any], policy: str | None, lease: _Lease
    ) -> _Outcome:
        """Run one task; a stop seen by the heartbeat timer cancels it (and its engine request)."""
        run = asyncio.create_task(self._consume(task, sampling, policy, lease))
        stopped = asyncio.create_task(lease.stopped.wait())
        try:
            await asyncio.wait({run, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not run.done():
                run.cancel()  # closing the engine stream cancels the request in the engine
                await asyncio.wait({run})
        return _Outcome("stop") if run.cancelled() else run.result()

    async def _consume(
        self, task: Task, sampling: dict[str, Any], policy: str | None, lease: _Lease
    ) -> _Outcome:
        where = f"document {task.doc_idx}, question {task.q_idx}"
        last = time.monotonic()
        final: dict[str, Any] | None = None
        events = self.engine.run(self.prompt(task.document, task.question), sampling, policy)
        try:
            async for ev in events:
                if ev.get("type") == "final":
                    final = ev
                    continue
                if ev.get("type") == "progress" and time.monotonic() - last >= self.progress_interval_s:
                    last = time.monotonic()
                    lease.partial = min(int(ev.get("done", 0)), task.prompt_tokens)
                    if await self._heartbeat(lease):
                        return _Outcome("stop")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if self.transient(e):
                return _Outcome("retry", f"{where}: {type(e).__name__}: {e}")
            message = self.classify(e)
            if message is None:
                log.exception("job %s: task (%d, %d) failed", task.job_id, task.doc_idx, task.q_idx)
                return _Outcome("fail", f"{where}: {type(e).__name__}: {e}")
            await self._record(lease, task, text=None, finish_reason="error", stats=None, error=message)
            return _Outcome("done")
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        if final is None:
            return _Outcome("fail", f"{where}: the engine ended without a result")
        if final.get("finish_reason") == "cancelled":
            return _Outcome("stop")
        stats = dict(final.get("stats") or {})
        await self._record(
            lease, task, text=final.get("text", ""), finish_reason=final.get("finish_reason"), stats=stats
        )
        self.on_task_done(stats)
        return _Outcome("done")

    async def _record(self, lease: _Lease, task: Task, **result: Any) -> None:
        async with lease.lock:
            lease.partial = 0
            await asyncio.to_thread(self.store.record_result, task, **result)


def build_prompt(
    document: str, question: str, system_prompt: str | None, template: str
) -> list[dict[str, str]]:
    """The chat messages of one (document, question) task."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": template.format(document=document, question=question)})
    return messages
