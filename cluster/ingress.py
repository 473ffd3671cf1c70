"""The HTTP ingress deployment (FastAPI): the routes of the OpenAI-compatible completions, the
document-job API and health.

A route reads and validates its body (cluster/schemas.py: the SamplingParams is built there), sends the engine
replica a typed `events.Request` and reads its typed events back (cluster/events.py); the OpenAI bodies
and SSE chunks are shaped in cluster/openai_format.py, errors in cluster/http_errors.py. The API key is
checked once for every route but /healthz (an app-level dependency). The ingress also owns the SQLite
job store and runs the job worker (cluster/job_worker.py) as a background task; its replicas run on the
head node, where the store's file is.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at runtime.
import asyncio
import logging
import secrets
from collections.abc import Awaitable
from typing import TypeVar, cast

from fastapi import Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from entropyinfer.cluster import openai_format
from entropyinfer.cluster.admission import Admission, check_document_tokens, check_job_counts, check_job_queue
from entropyinfer.cluster.auth import KeyRing
from entropyinfer.cluster.choices import engine_requests, score_only
from entropyinfer.cluster.config import ServeAppConfig, app_config
from entropyinfer.cluster.deadline import Deadline, within
from entropyinfer.cluster.engine_health import CONTENT_TYPE, engine_summary, prometheus_text
from entropyinfer.cluster.events import Accepted, Error, Event, Final, Prompt, Request
from entropyinfer.cluster.http_errors import (
    HTTPError,
    install_handlers,
    rejected,
    respond,
    to_http_error,
)
from entropyinfer.cluster.job_store import JobStore
from entropyinfer.cluster.job_tasks import EngineStream
from entropyinfer.cluster.job_types import (
    IdempotencyConflict,
    Job,
    JobParams,
    NewJob,
    new_documents,
    request_digest,
)
from entropyinfer.cluster.job_worker import JobWorker
from entropyinfer.cluster.metrics import JobMetrics
from entropyinfer.cluster.ray_errors import engine_unavailable
from entropyinfer.cluster.replica import EngineInfo, EngineStatus
from entropyinfer.cluster.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    JobRequest,
    SamplingFields,
    read_body,
)
from entropyinfer.cluster.sse import sse_events
from entropyinfer.errors import InvalidRequestError

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

HEALTH_TIMEOUT_S = 5.0  # /healthz asks the engine (and its shards) live, within this
INFO_TIMEOUT_S = 10.0  # engine info for /v1/models and job submission
SHUTDOWN_TIMEOUT_S = 5.0  # for the job worker to stop (well within Serve's 20 s graceful shutdown)
# Ray's resource on the head node (Serve pins its controller the same way): the ingress replicas run
# there, so the SQLite job store is one file on one disk whichever node a replica would otherwise get.
HEAD_NODE_RESOURCE = "node:__internal_head__"
PUBLIC_PATHS = ("/healthz",)
MAX_JOB_ID = 64  # longer ids are unknown without a look-up (ours are 36 characters)
METRICS_PATH = "/metrics"  # public too when `auth.metrics_public`


async def _require_api_key(request: HTTPRequest) -> None:
    """App-level dependency: every route but PUBLIC_PATHS needs a configured key (when any is); the
    caller's owner id (cluster/auth.py) goes to `request.state.owner` for the job routes."""
    route = request.scope.get("route")  # the matched route (the catch-all for unknown paths)
    path = getattr(route, "path", request.url.path)
    ingress: Ingress = serve.get_replica_context().servable_object  # type: ignore[assignment]
    if path in PUBLIC_PATHS or (path == METRICS_PATH and ingress.config.auth.metrics_public):
        request.state.owner = None
        return
    request.state.owner = ingress.keys.owner(request.headers.get("authorization"))


app = FastAPI(
    title="entropyinfer",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
    dependencies=[Depends(_require_api_key)],
)
install_handlers(app)


def _request(prompt: Prompt, req: SamplingFields, stream: bool = False) -> Request:
    return Request(secrets.token_hex(16), prompt, req.sampling_params, req.policy, stream)


async def _bounded(call: Awaitable[T], timeout_s: float, what: str) -> T:
    """Await an engine call for at most `timeout_s` (then cancel it): a 503 when it does not answer."""
    response = cast(DeploymentResponse[T], call)
    try:
        return await asyncio.wait_for(response, timeout_s)
    except asyncio.TimeoutError:
        response.cancel()
        raise HTTPError(
            503, f"engine unavailable: {what} took over {timeout_s:g}s; retry later", "unavailable"
        ) from None


async def _awaited(response: Awaitable[T]) -> T:
    return await response


# Serve pickles the class when it is decorated: what its methods use must be defined above it.
@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}})
@serve.ingress(app)
class Ingress:
    health_timeout_s = HEALTH_TIMEOUT_S
    info_timeout_s = INFO_TIMEOUT_S

    def __init__(self, engine: DeploymentHandle, args: dict[str, object] | ServeAppConfig) -> None:
        self.config: ServeAppConfig = app_config(args)
        self.engine = engine
        self.keys = KeyRing(self.config.auth.keys())
        self.admission = Admission(self.config)  # backpressure on the completion routes
        self.store = JobStore(self.config.jobs.db_file)
        self.metrics = JobMetrics()
        self.worker = JobWorker.from_config(
            self.store,
            EngineStream(engine),
            self.config.jobs,
            transient=engine_unavailable,
            on_job_done=lambda state: self.metrics.finished.inc(tags={"state": state}),
        )
        self._engine_info: EngineInfo | None = None
        self._worker_task: asyncio.Task[None] | None = None
        self._start_worker()

    def _start_worker(self) -> None:
        if self.worker.stopping or (self._worker_task is not None and not self._worker_task.done()):
            return
        if (
            self._worker_task is not None
            and not self._worker_task.cancelled()
            and self._worker_task.exception()
        ):
            log.error("job worker died (%r); restarting it", self._worker_task.exception())
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # started by the first request or health check
        self._worker_task = loop.create_task(self.worker.run_forever(self.config.jobs.workers))

    async def __del__(self) -> None:
        # Stop the worker loops first (cancelling their engine requests), then hand the jobs back: a loop
        # still running could otherwise claim a job after the hand-back and strand it for a lease.
        released = await self.worker.shutdown(self._worker_task, SHUTDOWN_TIMEOUT_S)
        log.info("ingress stopping: %d running job(s) handed back to the queue", released)

    async def check_health(self) -> None:
        self._start_worker()
        queued = await asyncio.to_thread(self.store.queue_length)
        self.metrics.queue_length.set(queued)

    # ---- helpers ------------------------------------------------------------------------------------

    async def _body(self, request: HTTPRequest, model: type[M]) -> M:
        self._start_worker()
        return await read_body(request, model, self.config.limits)

    async def _info(self) -> EngineInfo:
        """The engine's static info (model, context length), fetched once; a 503 if it does not answer."""
        if self._engine_info is None:
            try:
                call = self.engine.info.remote()
                info: EngineInfo = await _bounded(call, self.info_timeout_s, "engine info")
            except Exception as e:
                raise to_http_error(e) from None  # an HTTPError (the 503 of a timeout) as it is
            self._engine_info = info
        return self._engine_info

    def _check_common(self, req: SamplingFields, model: str | None = None) -> None:
        """The config's limits on a valid body: max_tokens cap, the policies and the model served here."""
        limits = self.config.limits
        if req.max_tokens is not None and req.max_tokens > limits.max_tokens:
            raise HTTPError(
                400,
                f"max_tokens: {req.max_tokens} exceeds the limit of {limits.max_tokens}",
                field="max_tokens",
            )
        if req.policy is not None and req.policy not in self.config.engine.policies:
            known = ", ".join(self.config.engine.policies)
            raise HTTPError(
                400, f"policy: unknown policy {req.policy!r}; this server runs: {known}", field="policy"
            )
        if model is not None and model not in (self.config.model_name, self.config.engine.llm.model.model):
            raise HTTPError(
                404,
                f"model: {model!r} is not served here; use {self.config.model_name!r}",
                "not_found",
                "model",
            )

    async def _generate(self, requests: list[Request], prompt_field: str) -> list[Final]:
        """The results of non-streaming requests; the first one rejected or failed stops the others."""
        responses = [
            cast(DeploymentResponse[Final | Error], self.engine.generate.remote(r)) for r in requests
        ]
        futures = [asyncio.ensure_future(_awaited(r)) for r in responses]
        try:
            for done in asyncio.as_completed(futures):
                out = await done
                if isinstance(out, Error):
                    raise rejected(out, prompt_field)
        except BaseException as e:  # one prompt failed (or the client left): stop the other generations
            for response, future in zip(responses, futures, strict=True):
                response.cancel()
                future.cancel()
            if isinstance(e, Exception):
                raise to_http_error(e, prompt_field) from None
            raise
        return [cast(Final, f.result()) for f in futures]

    # ---- routes -------------------------------------------------------------------------------------

    async def _status(self) -> EngineStatus:
        """The engine replica's live status (bounded in time, never cached); a 503 if it does not answer."""
        try:
            status: EngineStatus = await _bounded(
                self.engine.status.remote(), self.health_timeout_s, "the health check"
            )
        except Exception as e:
            raise HTTPError(503, f"engine not ready: {type(e).__name__}", "unavailable") from None
        return status

    @app.get("/healthz")
    async def healthz(self) -> dict[str, object]:
        """200 only when an engine replica and its shards answer now; the engine core's queues, KV pages
        and prefix-cache hit rate per shard (cluster/engine_health.py)."""
        status = await self._status()
        return {
            "status": "ok",
            "model": self.config.model_name,
            "device": status["device"],
            "engine": engine_summary(status),
        }

    @app.get("/metrics")
    async def metrics_text(self) -> Response:
        """Prometheus text: the engine replica's core counts and the job queue (`entropyinfer_up 0` and
        a 200 when the engine does not answer, so the scrape itself still succeeds)."""
        try:
            status: EngineStatus | None = await self._status()
        except HTTPError:
            status = None
        queued = await asyncio.to_thread(self.store.queue_length)
        return Response(prometheus_text(status, queued), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(self, request: HTTPRequest) -> Response:
        info = await self._info()
        card = {
            "id": self.config.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "entropyinfer",
            "max_context": info["max_context"],
            "policies": list(self.config.engine.policies),
            "default_policy": self.config.engine.llm.policy,
            "tensor_parallel_size": info.get("tensor_parallel_size", 1),
        }
        return respond(request, {"object": "list", "data": [card]})

    @app.post("/v1/completions")
    async def completions(self, request: HTTPRequest) -> Response:
        with self.admission.slot():
            return await self._completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: HTTPRequest) -> Response:
        with self.admission.slot():
            return await self._chat_completions(request)

    async def _completions(self, request: HTTPRequest) -> Response:
        req = await self._body(request, CompletionRequest)
        self._check_common(req, req.model)
        if len(req.prompts) > self.config.limits.max_prompts:
            raise HTTPError(
                400, f"prompt: more than {self.config.limits.max_prompts} prompts", field="prompt"
            )
        deadline = Deadline.of(req.timeout, self.config.limits)
        if req.stream:
            return await self._stream(
                _request(req.prompts[0], req, stream=True), req.include_usage, False, deadline
            )
        outs = await within(self._generate(engine_requests(list(req.prompts), req), "prompt"), deadline)
        if not req.generates:
            outs = [score_only(o) for o in outs]
        echoed = [p for p in req.prompts for _ in range(req.n)] if req.echo else None
        return respond(request, openai_format.completion_body(self.config.model_name, outs, echoed))

    async def _chat_completions(self, request: HTTPRequest) -> Response:
        req = await self._body(request, ChatCompletionRequest)
        self._check_common(req, req.model)
        deadline = Deadline.of(req.timeout, self.config.limits)
        if req.stream:
            return await self._stream(
                _request(req.chat(), req, stream=True), req.include_usage, True, deadline
            )
        outs = await within(self._generate(engine_requests([req.chat()], req), "messages"), deadline)
        return respond(request, openai_format.chat_body(self.config.model_name, outs))

    async def _stream(
        self, engine_request: Request, include_usage: bool, chat: bool, deadline: Deadline | None
    ) -> Response:
        """SSE: the request is validated (its first event is `Accepted`) before the 200 goes out; past
        the deadline before that a 408, after it the stream's last event is the 408's error."""
        prompt_field = "messages" if chat else "prompt"
        gen = cast(
            DeploymentResponseGenerator[Event], self.engine.options(stream=True).run.remote(engine_request)
        )
        try:
            first = await within(gen.__anext__(), deadline)
        except Exception as e:
            gen.cancel()
            raise to_http_error(e, prompt_field) from None
        if isinstance(first, Error):
            raise rejected(first, prompt_field)
        n = first.prompt_tokens if isinstance(first, Accepted) else 0
        chunks = openai_format.Chunks(self.config.model_name, chat)
        return StreamingResponse(
            sse_events(gen, chunks, n, include_usage, prompt_field, deadline),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    # ---- document jobs ------------------------------------------------------------------------------

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

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
    async def not_found(self, path: str, request: HTTPRequest) -> Response:
        raise HTTPError(404, f"no route /{path}", "not_found", "path")
