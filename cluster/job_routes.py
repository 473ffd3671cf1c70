"""The document-job routes of the HTTP ingress: submit (`POST /v1/jobs`, idempotent by key), status,
results and cancel, each job visible only to the API key that submitted it. `JobRoutes` is a part of the
`Ingress` deployment (cluster/ingress.py), registered on the shared `app` (cluster/ingress_base.py).
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at runtime.
import asyncio

from fastapi import Request as HTTPRequest
from fastapi.responses import Response

from entropyinfer.cluster.admission import check_document_tokens, check_job_counts, check_job_queue
from entropyinfer.cluster.http_errors import HTTPError, respond, to_http_error
from entropyinfer.cluster.ingress_base import MAX_JOB_ID, IngressBase, app
from entropyinfer.cluster.job_types import (
    IdempotencyConflict,
    Job,
    JobParams,
    NewJob,
    new_documents,
    request_digest,
)
from entropyinfer.cluster.job_worker import JobWorker
from entropyinfer.cluster.schemas import JobRequest
from entropyinfer.errors import InvalidRequestError


class JobRoutes(IngressBase):
    """`/v1/jobs` and `/v1/jobs/{job_id}` (GET, DELETE), `/v1/jobs/{job_id}/results`."""

    @app.post("/v1/jobs")
    async def create_job(self, request: HTTPRequest) -> Response:
        req = await self._body(request, JobRequest)
        self._check_common(req)
        limits = self.config.limits
        docs, questions = req.documents, req.question_list
        check_job_counts(limits, len(docs), len(questions))
        check_job_queue(limits, await asyncio.to_thread(self.store.queue_length))
        owner: str | None = request.state.owner
        key = req.idempotency_key or request.headers.get("idempotency-key") or None
        if key is not None and owner is not None:
            key = f"{owner}/{key}"  # each API key has its own idempotency keys
        params: JobParams = {"sampling": req.sampling_params.to_dict(), "policy": req.policy, "owner": owner}
        named = [(d.name, d.text) for d in docs]
        if key is not None:
            try:
                existing = await asyncio.to_thread(
                    self.store.lookup_key, key, request_digest(named, questions, params)
                )
            except IdempotencyConflict as e:
                raise HTTPError(409, str(e), "conflict", "idempotency_key") from None
            if existing is not None:
                return respond(request, {**existing.to_dict(), "created": False}, 200)
        prompts = self.worker.counting_prompts([text for _, text in named], questions)
        try:
            counts: list[int] = await self.engine.count_tokens.remote(prompts)
            max_context = (await self._info())["max_context"]
        except Exception as e:
            raise to_http_error(e, "documents") from None
        del prompts
        per_document = JobWorker.task_tokens(counts, len(named))
        check_document_tokens(limits, per_document)
        try:
            new_docs = new_documents(named, per_document, req.sampling_params.max_tokens, max_context)
        except InvalidRequestError as e:
            raise to_http_error(e) from None
        try:
            job, created = await asyncio.to_thread(
                self.store.submit, NewJob(new_docs, tuple(questions), params), key
            )
        except IdempotencyConflict as e:
            raise HTTPError(409, str(e), "conflict", "idempotency_key") from None
        self.worker.notify()
        self.metrics.queue_length.set(await asyncio.to_thread(self.store.queue_length))
        return respond(request, {**job.to_dict(), "created": created}, 201 if created else 200)

    async def _job_or_404(self, job_id: str, request: HTTPRequest) -> Job:
        """The job, if the caller's key submitted it (another key's job is a 404, like an unknown one)."""
        job = await asyncio.to_thread(self.store.get, job_id) if len(job_id) <= MAX_JOB_ID else None
        if job is None or job.params.get("owner") != request.state.owner:
            shown = job_id if len(job_id) <= MAX_JOB_ID else job_id[:MAX_JOB_ID] + "..."
            raise HTTPError(404, f"job_id: no job {shown!r} (unknown or expired)", "not_found", "job_id")
        return job

    @app.get("/v1/jobs/{job_id}")
    async def get_job(self, job_id: str, request: HTTPRequest) -> Response:
        return respond(request, (await self._job_or_404(job_id, request)).to_dict())

    @app.get("/v1/jobs/{job_id}/results")
    async def job_results(self, job_id: str, request: HTTPRequest) -> Response:
        job = await self._job_or_404(job_id, request)
        results = await asyncio.to_thread(self.store.results, job_id)
        return respond(
            request,
            {"object": "job.results", "job": job.to_dict(), "complete": job.finished, "results": results},
        )

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(self, job_id: str, request: HTTPRequest) -> Response:
        await self._job_or_404(job_id, request)
        job = await asyncio.to_thread(self.store.cancel, job_id)
        return respond(request, job.to_dict() if job is not None else {})
