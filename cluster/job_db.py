"""The SQLite file of the document-job store: its schema, the connection (WAL, one connection guarded by a
lock), short `BEGIN IMMEDIATE` transactions, and rows read back as `Job`s. `JobStore` (cluster/job_store.py)
holds the operations on it.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import cast

from entropyinfer.cluster.job_types import Job, JobParams

__all__ = ["SCHEMA_VERSION", "JobDB"]

SCHEMA_VERSION = 1

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


class JobDB:
    """The open job-store file; every transaction is short and thread-safe."""

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
            worker=r["worker"],
            params=cast(JobParams, json.loads(r["params"])),
        )
