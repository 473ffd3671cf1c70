"""The job worker: runs queued document jobs through the engine, one document at a time, all of the
document's questions at once.

Each worker loop claims a job from the store (cluster/job_store.py) under its own id and, document by
document, sends every pending (document, question) task of the document to the engine together, as typed
`events.Request`s (one chat prompt each, `build_prompt`: the document first, so the prompts share it as a
prefix). The engine core batches them and, with prefix caching, prefills the document once: the first
request writes its pages and the others wait for them (in-flight sharing) and prefill only their
question. Each result is written as it finishes; the job's lease is kept alive with a heartbeat on a
timer, and its progress is the prefill tokens of the finished tasks plus those of the tasks in flight. A
cancel seen by the heartbeat stops every task in flight; a task that must stop, requeue or fail the job
stops the document's other tasks too. Running a document's tasks is cluster/job_tasks.py's
(`DocumentTasks`; `EngineStream` is the engine side there: the engine replica's deployment handle).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Literal

from entropyinfer.cluster.config import JobsConfig
from entropyinfer.cluster.events import Prompt, Stat
from entropyinfer.cluster.job_store import JobStore
from entropyinfer.cluster.job_tasks import DocumentTasks, EngineRunner, Lease
from entropyinfer.cluster.job_types import TERMINAL, Job, JobState
from entropyinfer.errors import InvalidRequestError
from entropyinfer.shard.sampling import SamplingParams

log = logging.getLogger(__name__)

EndState = JobState | Literal["deleted"]  # where `process` leaves a job ("deleted": expired meanwhile)


class JobWorker(DocumentTasks):
    """Runs queued jobs: claims one, runs each document's pending tasks together (documents in order),
    writes each result, honours cancel.

    A task the engine rejects (an `Error` event) is recorded on the task and the job goes on;
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
        transient: Callable[[BaseException], bool] = lambda e: False,
        retry_backoff_s: float = 10.0,
        heartbeat_s: float | None = None,
        on_task_done: Callable[[dict[str, Stat]], None] = lambda stats: None,
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
        self.transient = transient
        self.retry_backoff_s = retry_backoff_s
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else lease_s / 4
        self.on_task_done = on_task_done
        self.on_job_done = on_job_done
        self._ids = {self.worker_id}  # every id this worker claims under (released on stop)
        self._wake = asyncio.Event()
        self._stopping = False
        self._paused_until = 0.0  # monotonic time: the engine was unavailable, take no job before

    @classmethod
    def from_config(
        cls,
        store: JobStore,
        engine: EngineRunner,
        config: JobsConfig,
        *,
        transient: Callable[[BaseException], bool] = lambda e: False,
        on_job_done: Callable[[str], None] = lambda state: None,
    ) -> JobWorker:
        """The worker the `jobs` section of the Serve config describes."""
        return cls(
            store,
            engine,
            lease_s=config.lease_s,
            max_attempts=config.max_attempts,
            poll_s=config.poll_s,
            progress_interval_s=config.progress_interval_s,
            result_ttl_s=config.result_ttl_s,
            system_prompt=config.system_prompt,
            prompt_template=config.prompt_template,
            transient=transient,
            retry_backoff_s=config.retry_backoff_s,
            on_job_done=on_job_done,
        )

    def prompt(self, document: str, question: str) -> list[dict[str, str]]:
        return build_prompt(document, question, self.system_prompt, self.prompt_template)

    def counting_prompts(self, documents: Sequence[str], questions: Sequence[str]) -> list[Prompt]:
        """The prompts whose token counts give every task's (`task_tokens`): each document once (with an
        empty question), each question once (with an empty document), and the bare template. Never a
        prompt per pair: that would be a copy of every document per question."""
        prompts: list[Prompt] = [self.prompt(text, "") for text in documents]
        prompts += [self.prompt("", q) for q in questions]
        prompts.append(self.prompt("", ""))
        return prompts

    @staticmethod
    def task_tokens(counts: Sequence[int], n_documents: int) -> list[tuple[int, ...]]:
        """Per document, the prompt tokens of its task for each question: n_doc + n_q - n_template."""
        docs, questions, template = counts[:n_documents], counts[n_documents:-1], counts[-1]
        return [tuple(d + q - template for q in questions) for d in docs]

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

    async def shutdown(self, runner: asyncio.Task[None] | None = None, timeout: float = 30.0) -> int:
        """Clean shutdown: stop taking jobs, cancel `runner` (the `run_forever` task) and wait for it (the
        engine requests in flight are cancelled), then hand the running jobs back to the queue."""
        self._stopping = True
        self._wake.set()
        if runner is not None and not runner.done():
            runner.cancel()
            await asyncio.wait({runner}, timeout=timeout)
        return await asyncio.to_thread(self.store.release, *self._ids)

    async def process(self, job: Job, worker_id: str | None = None) -> EndState:
        """Run one job claimed by `worker_id` (default `self.worker_id`) to a terminal state, or until it
        is requeued or taken away; returns the job's state. `on_job_done` sees terminal states at once,
        before any await, so a shutdown racing the job's end cannot lose the count."""
        lease = Lease(job.id, worker_id or self.worker_id)
        beat = asyncio.create_task(self._keep_alive(lease))
        try:
            state = await self._process(job, lease)
            if state in TERMINAL:
                self.on_job_done(state)
            return state
        finally:
            beat.cancel()
            await asyncio.wait({beat})

    async def _process(self, job: Job, lease: Lease) -> EndState:
        try:
            sampling = SamplingParams.from_dict(job.params["sampling"])
        except (InvalidRequestError, KeyError) as e:  # a row written by another version
            await asyncio.to_thread(self.store.finish, job.id, lease.worker, "failed", f"sampling: {e}")
            return "failed"
        policy = job.params.get("policy")
        # One document at a time (a job's documents are never all in memory at once), its questions together.
        for doc_idx in await asyncio.to_thread(self.store.pending_documents, job.id):
            tasks = await asyncio.to_thread(self.store.pending_tasks, job.id, doc_idx)
            if not tasks:
                continue
            if lease.stopped.is_set() or await self._heartbeat(lease):
                return await self._stop_job(lease)
            outcome = await self._run_document(tasks, sampling, policy, lease)
            if outcome.kind == "stop":
                return await self._stop_job(lease)
            if outcome.kind == "retry":
                return await self._requeue(lease, outcome.message or "engine unavailable")
            if outcome.kind == "fail":
                await asyncio.to_thread(self.store.finish, job.id, lease.worker, "failed", outcome.message)
                return "failed"
        if await self._heartbeat(lease):
            return await self._stop_job(lease)
        await asyncio.to_thread(self.store.finish, job.id, lease.worker, "succeeded")
        return "succeeded"

    async def _heartbeat(self, lease: Lease) -> bool:
        """Record liveness (and the current task's prefill progress); True: stop this job."""
        async with lease.lock:
            stop = await asyncio.to_thread(self.store.heartbeat, lease.job_id, lease.worker, lease.partial)
        if stop:
            lease.stopped.set()
        return stop

    async def _keep_alive(self, lease: Lease) -> None:
        """Heartbeat on a timer while the job runs (the engine may send nothing for a long time: queued
        behind other requests, or a replica starting); a stop it sees interrupts the task in flight."""
        while not lease.stopped.is_set():
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self._heartbeat(lease)
            except Exception:
                log.exception("job %s: heartbeat failed", lease.job_id)

    async def _requeue(self, lease: Lease, reason: str) -> EndState:
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

    async def _stop_job(self, lease: Lease) -> EndState:
        job = await asyncio.to_thread(self.store.get, lease.job_id)
        if job is not None and job.state == "running" and job.cancel_requested:
            await asyncio.to_thread(
                self.store.finish, lease.job_id, lease.worker, "cancelled", "cancelled by request"
            )
            return "cancelled"
        return job.state if job is not None else "deleted"


def build_prompt(
    document: str, question: str, system_prompt: str | None, template: str
) -> list[dict[str, str]]:
    """The chat messages of one (document, question) task."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": template.format(document=document, question=question)})
    return messages
