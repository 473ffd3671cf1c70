"""Running a document's tasks through the engine: every question of the document at once, each result
written as it finishes (the `JobWorker` of cluster/job_worker.py claims the jobs and keeps their leases).

`EngineRunner` is what the worker needs from the engine, `EngineStream` that over the engine replica's
deployment handle. A `Lease` is one claimed job in a worker loop (its stop signal and the prefill progress
of its tasks in flight); an `Outcome` is how a task, or a document, ended.
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

from entropyinfer.cluster.events import Error, Event, Final, Progress, Request, Stat
from entropyinfer.cluster.job_store import JobStore
from entropyinfer.cluster.job_types import Task
from entropyinfer.cluster.ray_errors import unwrap
from entropyinfer.shard.sampling import SamplingParams

log = logging.getLogger(__name__)


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
class Outcome:
    """How one task ended: done (result or per-task error recorded), stop (cancel requested, or the job
    is no longer ours), retry (the engine was unavailable: requeue the job), fail (fail the job)."""

    kind: Literal["done", "stop", "retry", "fail"]
    message: str | None = None


class Lease:
    """One claimed job in a worker loop: its heartbeat and the stop signal."""

    def __init__(self, job_id: str, worker: str) -> None:
        self.job_id = job_id
        self.worker = worker
        self.partials: dict[int, int] = {}  # question index -> prefill tokens of that task in flight
        self.stopped = asyncio.Event()  # cancel requested, or the job was taken away
        self.lock = asyncio.Lock()  # orders heartbeats and result writes of this job

    @property
    def partial(self) -> int:
        """Prefill tokens of the tasks in flight (the store adds those of the finished ones)."""
        return sum(self.partials.values())


class DocumentTasks:
    """The task-running half of `JobWorker` (a mixin: the worker sets these attributes and provides
    `prompt` and `_heartbeat`)."""

    store: JobStore
    engine: EngineRunner
    progress_interval_s: float
    transient: Callable[[BaseException], bool]
    on_task_done: Callable[[dict[str, Stat]], None]

    def prompt(self, document: str, question: str) -> list[dict[str, str]]:
        raise NotImplementedError

    async def _heartbeat(self, lease: Lease) -> bool:
        raise NotImplementedError

    async def _run_document(
        self, tasks: Sequence[Task], sampling: SamplingParams, policy: str | None, lease: Lease
    ) -> Outcome:
        """Run a document's tasks concurrently; the first that ends otherwise than "done" cancels the
        others (their engine requests too) and is the document's outcome (stop before retry before fail
        when several end at once)."""
        if len(tasks) == 1:
            return await self._run_task(tasks[0], sampling, policy, lease)
        running = {asyncio.create_task(self._run_task(t, sampling, policy, lease)) for t in tasks}
        ended: list[Outcome] = []
        try:
            while running and not ended:
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                ended = [o for o in (d.result() for d in done) if o.kind != "done"]
        finally:
            for t in running:
                t.cancel()
            if running:
                await asyncio.wait(running)
        if not ended:
            return Outcome("done")
        rank = {"stop": 0, "retry": 1, "fail": 2}
        return min(ended, key=lambda o: rank[o.kind])

    async def _run_task(
        self, task: Task, sampling: SamplingParams, policy: str | None, lease: Lease
    ) -> Outcome:
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
        return Outcome("stop") if run.cancelled() else run.result()

    async def _consume(
        self, task: Task, sampling: SamplingParams, policy: str | None, lease: Lease
    ) -> Outcome:
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
                    lease.partials[task.q_idx] = min(ev.done, task.prompt_tokens)
                    if await self._heartbeat(lease):
                        return Outcome("stop")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if self.transient(e):
                return Outcome("retry", f"{where}: {type(e).__name__}: {e}")
            log.exception("job %s: task (%d, %d) failed", task.job_id, task.doc_idx, task.q_idx)
            return Outcome("fail", f"{where}: {type(e).__name__}: {e}")
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        if isinstance(end, Error):  # the engine rejected this task: recorded, the job goes on
            await self._record(lease, task, None, "error", None, f"{end.type}: {end.message}")
            return Outcome("done")
        if end is None:
            return Outcome("fail", f"{where}: the engine ended without a result")
        if end.cancelled:
            return Outcome("stop")
        await self._record(lease, task, end.text, end.finish_reason, end.stats)
        self.on_task_done(end.stats)
        return Outcome("done")

    async def _record(
        self,
        lease: Lease,
        task: Task,
        text: str | None,
        finish_reason: str,
        stats: dict[str, Stat] | None,
        error: str | None = None,
    ) -> None:
        async with lease.lock:
            lease.partials.pop(task.q_idx, None)
            await asyncio.to_thread(
                self.store.record_result,
                task,
                text=text,
                finish_reason=finish_reason,
                stats=stats,
                error=error,
            )
