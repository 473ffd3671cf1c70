"""Document jobs: a SQLite store (jobs, documents, tasks with their results, idempotency keys) and the
worker that runs queued jobs through the engine, one (document, question) task at a time.

States: queued -> running -> succeeded | failed | cancelled. A job is a batch of documents and questions;
each (document, question) pair is a task whose prompt-token count is known at submission, so progress
is reported as prefill tokens done / total and documents done / total. Finished tasks are written as they
finish: a job that is resumed (after its worker was lost) skips them.

The store is plain synchronous sqlite3 (WAL, one connection guarded by a lock); it imports nothing from
Ray, so its tests need no cluster. Several processes may share one file: claiming a job is one
`BEGIN IMMEDIATE` transaction.
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
from typing import Any, Protocol

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

    def claim(self, worker: str) -> Job | None:
        """Take the oldest queued job for `worker` (state running), or None."""
        now = time.time()
        with self._tx() as db:
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

    def pending_tasks(self, job_id: str) -> list[Task]:
        with self._lock:
            rows = self._db.execute(
                "SELECT t.doc_idx, t.q_idx, t.question, t.prompt_tokens, d.text FROM tasks t"
                " JOIN documents d ON d.job_id = t.job_id AND d.idx = t.doc_idx"
                " WHERE t.job_id = ? AND t.done = 0 ORDER BY t.doc_idx, t.q_idx",
                (job_id,),
            ).fetchall()
        return [
            Task(job_id, r["doc_idx"], r["q_idx"], r["question"], r["prompt_tokens"], r["text"]) for r in rows
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

    def release(self, worker: str) -> int:
        """Put `worker`'s running jobs back in the queue (a clean shutdown); returns how many."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'queued', worker = NULL WHERE state = 'running' AND worker = ?",
                (worker,),
            )
            return cur.rowcount

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
    be served raises (InvalidRequestError / PromptTooLongError are recorded on the task; anything else
    fails the job). Leaving the iterator early must cancel the request in the engine.
    """

    def run(
        self, prompt: list[dict[str, str]], sampling: dict[str, Any], policy: str | None
    ) -> AsyncIterator[dict[str, Any]]: ...


class TaskError(Exception):
    """A task's request was rejected by the engine; the job goes on with its other tasks."""


class JobWorker:
    """Runs queued jobs: claims one, runs its pending tasks in order, writes each result, honours cancel.

    `classify(exc)` tells a task-level rejection (returns a message) from a failure of the job (None).
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
        self.on_task_done = on_task_done
        self.on_job_done = on_job_done
        self._wake = asyncio.Event()
        self._stopping = False

    def prompt(self, document: str, question: str) -> list[dict[str, str]]:
        return build_prompt(document, question, self.system_prompt, self.prompt_template)

    def notify(self) -> None:
        """A job was submitted: look at the queue now instead of at the next poll."""
        self._wake.set()

    async def run_forever(self, concurrency: int = 1) -> None:
        await asyncio.gather(*(self._loop() for _ in range(concurrency)))

    async def _loop(self) -> None:
        last_sweep = 0.0
        while not self._stopping:
            try:
                if time.monotonic() - last_sweep > min(self.lease_s / 2, 30.0):
                    await asyncio.to_thread(self.store.recover, self.lease_s, self.max_attempts)
                    await asyncio.to_thread(self.store.expire, self.result_ttl_s)
                    last_sweep = time.monotonic()
                job = await asyncio.to_thread(self.store.claim, self.worker_id)
                if job is None:
                    self._wake.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.poll_s)
                    continue
                self.on_job_done(await self.process(job))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job worker loop error; retrying")
                await asyncio.sleep(self.poll_s)

    def stop(self) -> int:
        """Stop taking jobs and hand running ones back to the queue (for a clean shutdown)."""
        self._stopping = True
        self._wake.set()
        return self.store.release(self.worker_id)

    async def process(self, job: Job) -> str:
        """Run one claimed job to a terminal state (or until it is taken away); returns the state."""
        sampling = job.params.get("sampling", {})
        policy = job.params.get("policy")
        tasks = await asyncio.to_thread(self.store.pending_tasks, job.id)
        for task in tasks:
            if await asyncio.to_thread(self.store.heartbeat, job.id, self.worker_id, 0):
                return await self._stop_job(job.id)
            outcome = await self._run_task(task, sampling, policy)
            if outcome == "stop":
                return await self._stop_job(job.id)
            if outcome is not None and outcome != "done":
                await asyncio.to_thread(self.store.finish, job.id, self.worker_id, "failed", outcome)
                return "failed"
        if await asyncio.to_thread(self.store.heartbeat, job.id, self.worker_id, 0):
            return await self._stop_job(job.id)
        await asyncio.to_thread(self.store.finish, job.id, self.worker_id, "succeeded")
        return "succeeded"

    async def _stop_job(self, job_id: str) -> str:
        job = await asyncio.to_thread(self.store.get, job_id)
        if job is not None and job.state == "running" and job.cancel_requested:
            await asyncio.to_thread(
                self.store.finish, job_id, self.worker_id, "cancelled", "cancelled by request"
            )
            return "cancelled"
        return job.state if job is not None else "deleted"

    async def _run_task(self, task: Task, sampling: dict[str, Any], policy: str | None) -> str | None:
        """'done', 'stop' (cancel requested or job lost), or an error message that fails the job."""
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
                    done = min(int(ev.get("done", 0)), task.prompt_tokens)
                    stop = await asyncio.to_thread(self.store.heartbeat, task.job_id, self.worker_id, done)
                    if stop:
                        return "stop"
        except asyncio.CancelledError:
            raise
        except Exception as e:
            message = self.classify(e)
            if message is None:
                log.exception("job %s: task (%d, %d) failed", task.job_id, task.doc_idx, task.q_idx)
                return f"document {task.doc_idx}, question {task.q_idx}: {type(e).__name__}: {e}"
            await asyncio.to_thread(
                self.store.record_result, task, text=None, finish_reason="error", stats=None, error=message
            )
            return "done"
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        if final is None:
            return f"document {task.doc_idx}, question {task.q_idx}: the engine ended without a result"
        if final.get("finish_reason") == "cancelled":
            return "stop"
        stats = dict(final.get("stats") or {})
        await asyncio.to_thread(
            self.store.record_result,
            task,
            text=final.get("text", ""),
            finish_reason=final.get("finish_reason"),
            stats=stats,
        )
        self.on_task_done(stats)
        return "done"


def build_prompt(
    document: str, question: str, system_prompt: str | None, template: str
) -> list[dict[str, str]]:
    """The chat messages of one (document, question) task."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": template.format(document=document, question=question)})
    return messages
