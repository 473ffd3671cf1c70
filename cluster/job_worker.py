"""The job worker: runs queued document jobs through the engine, one (document, question) task at a time.

Each worker loop claims a job from the store (cluster/job_store.py) under its own id, runs its pending
tasks in order as typed `events.Request`s (one chat prompt each, `build_prompt`), writes each result as
it finishes, and keeps the job's lease alive with a heartbeat on a timer; a cancel seen by the heartbeat
stops the task in flight. `EngineStream` is the engine side: the engine replica's deployment handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, cast

from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from entropyinfer.cluster.config import JobsConfig
from entropyinfer.cluster.events import Error, Event, Final, Progress, Prompt, Request, Stat
from entropyinfer.cluster.job_store import JobStore
from entropyinfer.cluster.job_types import TERMINAL, Job, JobState, Task
from entropyinfer.cluster.ray_errors import unwrap
from entropyinfer.errors import InvalidRequestError
from entropyinfer.shard.sampling import SamplingParams

log = logging.getLogger(__name__)

EndState = JobState | Literal["deleted"]  # where `process` leaves a job ("deleted": expired meanwhile)


class EngineRunner(Protocol):
    """What the worker needs from the engine: run one request, yielding its events (cluster/events.py).

    `Progress` while prefilling, then `Final` (or `Error`: the task is rejected, recorded on it, and the
    job goes on). A failure raises: an engine outage (`transient`) requeues the job, anything else fails
    it. Leaving the iterator early must cancel the request in the engine.
    """

    def run(self, request: Request) -> AsyncIterator[Event]: ...


class EngineStream:
    """`EngineRunner` over the engine replica's deployment handle: leaving early cancels the request."""

    def __init__(self, engine: DeploymentHandle) -> None:
        self.engine = engine

    async def run(self, request: Request) -> AsyncIterator[Event]:
        gen = cast(DeploymentResponseGenerator[Event], self.engine.options(stream=True).run.remote(request))
        finished = False
        try:
            async for event in gen:
                finished = isinstance(event, (Final, Error))
                yield event
        except Exception as e:
            raise unwrap(e) from None
        finally:
            if not finished:
                gen.cancel()


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

    async def _process(self, job: Job, lease: _Lease) -> EndState:
        try:
            sampling = SamplingParams.from_dict(job.params["sampling"])
        except (InvalidRequestError, KeyError) as e:  # a row written by another version
            await asyncio.to_thread(self.store.finish, job.id, lease.worker, "failed", f"sampling: {e}")
            return "failed"
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

    async def _requeue(self, lease: _Lease, reason: str) -> EndState:
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

    async def _stop_job(self, lease: _Lease) -> EndState:
        job = await asyncio.to_thread(self.store.get, lease.job_id)
        if job is not None and job.state == "running" and job.cancel_requested:
            await asyncio.to_thread(
                self.store.finish, lease.job_id, lease.worker, "cancelled", "cancelled by request"
            )
            return "cancelled"
        return job.state if job is not None else "deleted"

    async def _run_task(
        self, task: Task, sampling: SamplingParams, policy: str | None, lease: _Lease
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
        self, task: Task, sampling: SamplingParams, policy: str | None, lease: _Lease
    ) -> _Outcome:
        where = f"document {task.doc_idx}, question {task.q_idx}"
        request_id = f"{task.job_id}/{task.doc_idx}/{task.q_idx}/{uuid.uuid4().hex[:8]}"
        prompt = self.prompt(task.document, task.question)
        last = time.monotonic()
        end: Final | Error | None = None
        events = self.engine.run(Request(request_id, prompt, sampling, policy, stream=False))
        try:
            async for ev in events:
                if isinstance(ev, (Final, Error)):
                    end = ev
                elif isinstance(ev, Progress) and time.monotonic() - last >= self.progress_interval_s:
                    last = time.monotonic()
                    lease.partial = min(ev.done, task.prompt_tokens)
                    if await self._heartbeat(lease):
                        return _Outcome("stop")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if self.transient(e):
                return _Outcome("retry", f"{where}: {type(e).__name__}: {e}")
            log.exception("job %s: task (%d, %d) failed", task.job_id, task.doc_idx, task.q_idx)
            return _Outcome("fail", f"{where}: {type(e).__name__}: {e}")
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        if isinstance(end, Error):  # the engine rejected this task: recorded, the job goes on
            await self._record(lease, task, None, "error", None, f"{end.type}: {end.message}")
            return _Outcome("done")
        if end is None:
            return _Outcome("fail", f"{where}: the engine ended without a result")
        if end.cancelled:
            return _Outcome("stop")
        await self._record(lease, task, end.text, end.finish_reason, end.stats)
        self.on_task_done(end.stats)
        return _Outcome("done")

    async def _record(
        self,
        lease: _Lease,
        task: Task,
        text: str | None,
        finish_reason: str,
        stats: dict[str, Stat] | None,
        error: str | None = None,
    ) -> None:
        async with lease.lock:
            lease.partial = 0
            await asyncio.to_thread(
                self.store.record_result,
                task,
                text=text,
                finish_reason=finish_reason,
                stats=stats,
                error=error,
            )


def build_prompt(
    document: str, question: str, system_prompt: str | None, template: str
) -> list[dict[str, str]]:
    """The chat messages of one (document, question) task."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": template.format(document=document, question=question)})
    return messages
