"""The document-job store: a SQLite file of jobs, documents, tasks with their results, idempotency keys
(the records are in job_types.py; cluster/job_worker.py runs the jobs).

Finished tasks are written as they finish: a job that is resumed (after its worker was lost, or the
engine was unavailable) skips them.

The store is plain synchronous sqlite3 (WAL, one connection guarded by a lock; the file, its schema and
transactions are cluster/job_db.py's `JobDB`, which `JobStore` extends); it imports nothing from
Ray, so its tests need no cluster. Several processes on one host may share one file (ingress replicas,
or an old and a new replica during a redeploy): claiming a job is one `BEGIN IMMEDIATE` transaction and
every worker loop has its own id, so a job runs in one place; a running job is heartbeated on a timer.
The file must be on a local disk of that host (SQLite locking is not safe over network filesystems).
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable
from typing import Literal

from entropyinfer.cluster.events import Stat
from entropyinfer.cluster.job_db import JobDB
from entropyinfer.cluster.job_types import (
    TERMINAL,
    IdempotencyConflict,
    Job,
    JobState,
    NewJob,
    ResultBody,
    Task,
)

log = logging.getLogger(__name__)

Lost = Literal["queued", "failed", "cancelled"]  # what becomes of a job that lost its worker or engine


class JobStore(JobDB):
    """SQLite-backed job store; every method is one short transaction and is thread-safe."""

    # ---- submission and reads -------------------------------------------------------------------

    def submit(self, job: NewJob, idempotency_key: str | None = None) -> tuple[Job, bool]:
        """Persist a new job (state queued); returns (job, created). A known key returns its job."""
        digest = job.request_hash()
        now = time.time()
        job_id = "job-" + secrets.token_hex(16)  # 128 random bits: unguessable
        with self._tx() as db:
            if idempotency_key is not None:
                existing = self._by_key(db, idempotency_key, digest)
                if existing is not None:
                    return existing, False
                db.execute("DELETE FROM idempotency WHERE key = ?", (idempotency_key,))  # of an expired job
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
            return self._by_key(self._db, key, digest)

    def _by_key(self, db: sqlite3.Connection, key: str, digest: str) -> Job | None:
        row = db.execute("SELECT job_id, request_hash FROM idempotency WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        if row["request_hash"] != digest:
            raise IdempotencyConflict(key, row["job_id"])
        return self._get(db, row["job_id"])

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._get(self._db, job_id)

    def results(self, job_id: str) -> list[ResultBody]:
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
        stats: dict[str, Stat] | None,
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

    def finish(self, job_id: str, worker: str, state: JobState, error: str | None = None) -> None:
        assert state in TERMINAL
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = ?, error = ?, finished_at = ?, worker = NULL"
                " WHERE id = ? AND worker = ? AND state = 'running'",
                (state, error, time.time(), job_id, worker),
            )

    def release(self, *workers: str) -> int:
        """Put these workers' running jobs back in the queue (a clean shutdown); returns how many. A job
        whose cancel was asked for but not yet seen by its worker ends cancelled instead (a shutdown in the
        middle of a cancel does not run the job again)."""
        now = time.time()
        with self._tx() as db:
            released = 0
            for worker in workers:
                db.execute(
                    "UPDATE jobs SET state = 'cancelled', worker = NULL, finished_at = ?,"
                    " error = 'cancelled by request' WHERE state = 'running' AND worker = ?"
                    " AND cancel_requested = 1",
                    (now, worker),
                )
                released += db.execute(
                    "UPDATE jobs SET state = 'queued', worker = NULL WHERE state = 'running' AND worker = ?",
                    (worker,),
                ).rowcount
            return released

    def requeue(self, job_id: str, worker: str, max_attempts: int, reason: str) -> tuple[Lost, int] | None:
        """The engine was unavailable while `worker` ran the job: queue it again (finished tasks stay
        done), counted in lost_count like a lost worker, or fail it at `max_attempts`. Returns (state,
        lost_count), or None when the job is no longer this worker's."""
        with self._tx() as db:
            row = db.execute(
                "SELECT lost_count, cancel_requested FROM jobs"
                " WHERE id = ? AND worker = ? AND state = 'running'",
                (job_id, worker),
            ).fetchone()
            if row is None:
                return None
            lost = row["lost_count"] + 1
            why = f"the engine was unavailable {lost} times ({reason}); gave up"
            return self._lose(db, job_id, lost, bool(row["cancel_requested"]), max_attempts, why), lost

    def recover(self, lease_s: float, max_attempts: int) -> tuple[int, int]:
        """Running jobs whose worker stopped heartbeating for `lease_s`: requeue them, or fail them once
        they were lost `max_attempts` times. Returns (requeued, failed)."""
        states: list[str] = []
        with self._tx() as db:
            rows = db.execute(
                "SELECT id, lost_count, cancel_requested FROM jobs"
                " WHERE state = 'running' AND heartbeat_at < ?",
                (time.time() - lease_s,),
            ).fetchall()
            for r in rows:
                lost = r["lost_count"] + 1
                why = (
                    f"the worker running this job was lost {lost} times (no heartbeat for {lease_s:g}s);"
                    " giving up"
                )
                states.append(self._lose(db, r["id"], lost, bool(r["cancel_requested"]), max_attempts, why))
        requeued, failed = states.count("queued"), states.count("failed")
        if requeued or failed:
            log.warning("job store: %d lost job(s) requeued, %d failed", requeued, failed)
        return requeued, failed

    def _lose(
        self, db: sqlite3.Connection, job_id: str, lost: int, cancel: bool, limit: int, why: str
    ) -> Lost:
        """A running job lost its worker or its engine for the `lost`-th time: cancelled if a cancel was
        asked for, failed (with `why`) once `lost` reaches `limit`, else queued again (finished tasks
        stay done)."""
        state: Lost = "queued"
        error, finished_at = None, None
        if cancel:
            state, error, finished_at = "cancelled", "cancelled by request", time.time()
        elif lost >= limit:
            state, error, finished_at = "failed", why, time.time()
        db.execute(
            "UPDATE jobs SET state = ?, error = ?, finished_at = ?, worker = NULL, lost_count = ?,"
            " prefill_done = ? WHERE id = ?",
            (state, error, finished_at, lost, JobStore._done_prefill(db, job_id), job_id),
        )
        return state

    def expire(self, ttl_s: float) -> int:
        """Delete jobs (documents, results, keys) finished more than `ttl_s` ago."""
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at < ?",
                (time.time() - ttl_s,),
            )
            return cur.rowcount
