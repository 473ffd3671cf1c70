"""The HTTP ingress deployment (FastAPI): OpenAI-compatible completions, the document-job API, health.

Every error is a JSON (or msgpack, per Accept) body `{"error": {"message", "type", "field"}}` with a
4xx status for bad requests, so a client always learns which field to fix and the replica keeps serving.
The API key is checked once for every route but /healthz (an app-level dependency). The ingress also owns
the SQLite job store and runs the job worker as a background task; its replicas run on the head node,
where the store's file is.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at runtime.
import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar, cast

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
from starlette.exceptions import HTTPException as StarletteHTTPException

from entropyinfer.cluster import wire
from entropyinfer.cluster.config import ServeAppConfig, app_config
from entropyinfer.cluster.jobs import (
    IdempotencyConflict,
    JobStore,
    JobWorker,
    NewDocument,
    NewJob,
    request_digest,
)
from entropyinfer.cluster.metrics import JobMetrics
from entropyinfer.cluster.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    JobRequest,
    SamplingFields,
    first_error,
)
from entropyinfer.errors import (
    ConfigError,
    InvalidRequestError,
    PromptTooLongError,
    RequestCancelled,
    UnknownPolicyError,
)

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_JOB_MAX_TOKENS = 256
DEFAULT_CHAT_MAX_TOKENS = 256
HEALTH_TIMEOUT_S = 5.0  # /healthz asks the engine (and its shards) live, within this
INFO_TIMEOUT_S = 10.0  # engine info for /v1/models and job submission
SHUTDOWN_TIMEOUT_S = 5.0  # for the job worker to stop (well within Serve's 20 s graceful shutdown)
# Ray's resource on the head node (Serve pins its controller the same way): the ingress replicas run
# there, so the SQLite job store is one file on one disk whichever node a replica would otherwise get.
HEAD_NODE_RESOURCE = "node:__internal_head__"
PUBLIC_PATHS = ("/healthz",)


async def _require_api_key(request: Request) -> None:
    """App-level dependency: every route but PUBLIC_PATHS needs the key when one is configured."""
    route = request.scope.get("route")  # the matched route (the catch-all for unknown paths)
    if getattr(route, "path", request.url.path) in PUBLIC_PATHS:
        return
    ingress: Ingress = serve.get_replica_context().servable_object  # type: ignore[assignment]
    ingress._authorize(request)


app = FastAPI(
    title="entropyinfer",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
    dependencies=[Depends(_require_api_key)],
)


class HTTPError(Exception):
    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", field: str | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.field = field

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.type, "field": self.field, "code": self.status}
        }


def _respond(request: Request, body: Any, status: int = 200) -> Response:
    fmt = wire.response_format(request.headers.get("accept"))
    return Response(wire.encode(body, fmt), status_code=status, media_type=wire.media_type(fmt))


@app.exception_handler(HTTPError)
async def _http_error(request: Request, exc: HTTPError) -> Response:
    return _respond(request, exc.body(), exc.status)


@app.exception_handler(StarletteHTTPException)
async def _starlette_error(request: Request, exc: StarletteHTTPException) -> Response:
    typ = "not_found" if exc.status_code == 404 else "invalid_request_error"
    return _respond(request, HTTPError(exc.status_code, str(exc.detail), typ).body(), exc.status_code)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    errors = exc.errors()
    loc = [str(x) for x in (errors[0].get("loc", ()) if errors else ()) if x not in ("body", "query", "path")]
    field = ".".join(loc) or None
    return _respond(
        request,
        HTTPError(400, f"{field}: {errors[0].get('msg') if errors else exc}", field=field).body(),
        400,
    )


def unwrap(exc: BaseException) -> BaseException:
    """The original exception inside Ray's wrappers (a replica or actor re-raises what it got)."""
    seen = 0
    while isinstance(exc, RayTaskError) and seen < 8:
        cause = getattr(exc, "cause", None)
        if cause is None:
            break
        exc, seen = cause, seen + 1
    return exc


def engine_unavailable(exc: BaseException) -> bool:
    """The engine could not take the request now (replica or actor gone or restarting, back-pressure):
    a 503 for a client, a retry later for a job."""
    exc = unwrap(exc)
    return isinstance(exc, (RayActorError, serve.exceptions.BackPressureError)) or type(exc).__name__ in (
        "DeploymentUnavailableError",
        "ReplicaUnavailableError",
        "ActorUnavailableError",
    )


def to_http_error(exc: BaseException, prompt_field: str = "prompt") -> HTTPError:
    """Map an engine-side exception to the HTTP error a client sees."""
    exc = unwrap(exc)
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, UnknownPolicyError):
        return HTTPError(400, f"policy: {exc}", field="policy")
    if isinstance(exc, PromptTooLongError):
        return HTTPError(400, f"{prompt_field}: {exc}", field=prompt_field)
    if isinstance(exc, InvalidRequestError):
        field = exc.field or prompt_field
        return HTTPError(400, f"{field}: {exc}", field=field)
    if isinstance(exc, ConfigError):
        return HTTPError(400, str(exc))
    if isinstance(exc, RequestCancelled):
        return HTTPError(499, "request cancelled", "cancelled")
    if engine_unavailable(exc):
        return HTTPError(503, f"engine unavailable: {exc}; retry later", "unavailable")
    log.exception("internal error", exc_info=exc)
    return HTTPError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")


class EngineStream:
    """`EngineRunner` over the engine deployment handle (for the job worker): leaving early cancels."""

    def __init__(self, engine: DeploymentHandle) -> None:
        self.engine = engine

    async def run(
        self, prompt: list[dict[str, str]], sampling: dict[str, Any], policy: str | None
    ) -> AsyncIterator[dict[str, Any]]:
        gen = cast(
            DeploymentResponseGenerator[Any],
            self.engine.options(stream=True).run.remote(prompt, sampling, policy, False),
        )
        finished = False
        try:
            async for event in gen:
                finished = event.get("type") == "final"
                yield event
        except Exception as e:
            raise unwrap(e) from None
        finally:
            if not finished:
                gen.cancel()


def _classify_task_error(exc: BaseException) -> str | None:
    """A per-document rejection (recorded on the task) vs. a failure of the whole job (None)."""
    exc = unwrap(exc)
    if isinstance(exc, (InvalidRequestError, PromptTooLongError, UnknownPolicyError)):
        return f"{type(exc).__name__}: {exc}"
    return None


async def _bounded(call: Any, timeout_s: float, what: str) -> Any:
    """Await an engine call for at most `timeout_s` (then cancel it): a 503 when it does not answer."""
    response = cast(DeploymentResponse[Any], call)
    try:
        return await asyncio.wait_for(response, timeout_s)
    except asyncio.TimeoutError:
        response.cancel()
        raise HTTPError(
            503, f"engine unavailable: {what} took over {timeout_s:g}s; retry later", "unavailable"
        ) from None


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}})
@serve.ingress(app)
class Ingress:
    health_timeout_s = HEALTH_TIMEOUT_S
    info_timeout_s = INFO_TIMEOUT_S

    def __init__(self, engine: DeploymentHandle, args: dict[str, Any]) -> None:
        self.config: ServeAppConfig = app_config(args)
        self.engine = engine
        self.api_key = self.config.auth.resolve()
        self.store = JobStore(self.config.jobs.db_file)
        self.metrics = JobMetrics()
        jobs = self.config.jobs
        self.worker = JobWorker(
            self.store,
            EngineStream(engine),
            lease_s=jobs.lease_s,
            max_attempts=jobs.max_attempts,
            poll_s=jobs.poll_s,
            progress_interval_s=jobs.progress_interval_s,
            result_ttl_s=jobs.result_ttl_s,
            system_prompt=jobs.system_prompt,
            prompt_template=jobs.prompt_template,
            classify=_classify_task_error,
            transient=engine_unavailable,
            retry_backoff_s=jobs.retry_backoff_s,
            on_job_done=lambda state: self.metrics.finished.inc(tags={"state": state}),
        )
        self._engine_info: dict[str, Any] | None = None
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

    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not token or not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise HTTPError(
                401, "missing or wrong API key: send `Authorization: Bearer <key>`", "authentication_error"
            )

    async def _body(self, request: Request, model: type[M]) -> M:
        """Read (within the size limit), decode (JSON or msgpack) and validate a request body."""
        self._start_worker()
        limit = self.config.limits.max_body_bytes
        fmt = self._format(request)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise HTTPError(
                413, f"body of {declared} bytes exceeds the limit of {limit}", "request_too_large", "body"
            )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise HTTPError(413, f"body exceeds the limit of {limit} bytes", "request_too_large", "body")
        bounds = wire.Limits(
            max_items=self.config.limits.max_wire_items,
            max_containers=4 * self.config.limits.max_wire_items + 64,
        )
        try:
            data = wire.decode(bytes(body), fmt, bounds)
        except wire.WireError as e:
            raise HTTPError(e.status, str(e), field="body") from None
        if not isinstance(data, dict):
            raise HTTPError(400, f"the body must be an object, got {type(data).__name__}", field="body")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            field, message = first_error(e)
            raise HTTPError(400, message, field=field or "body") from None

    @staticmethod
    def _format(request: Request) -> wire.Format:
        try:
            return wire.format_of(request.headers.get("content-type"))
        except wire.WireError as e:
            raise HTTPError(e.status, str(e), "unsupported_media_type", "content-type") from None

    async def _info(self) -> dict[str, Any]:
        """The engine's static info (model, context length), fetched once; a 503 if it does not answer."""
        if self._engine_info is None:
            try:
                self._engine_info = await _bounded(
                    self.engine.info.remote(), self.info_timeout_s, "engine info"
                )
            except Exception as e:
                raise to_http_error(e) from None  # an HTTPError (the 503 of a timeout) as it is
        return self._engine_info

    def _check_common(self, req: SamplingFields, model: str | None = None) -> None:
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
        if model is not None and model not in (self.config.model_name, self.config.engine.model):
            raise HTTPError(
                404,
                f"model: {model!r} is not served here; use {self.config.model_name!r}",
                "not_found",
                "model",
            )

    # ---- routes -------------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """200 only when an engine replica and its shards answer now (bounded in time, never cached)."""
        try:
            status = await _bounded(self.engine.status.remote(), self.health_timeout_s, "the health check")
        except Exception as e:
            raise HTTPError(503, f"engine not ready: {type(e).__name__}", "unavailable") from None
        return {"status": "ok", "model": self.config.model_name, "device": status.get("device")}

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        info = await self._info()
        card = {
            "id": self.config.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "entropyinfer",
            "max_context": info.get("max_context"),
            "policies": list(self.config.engine.policies),
            "default_policy": self.config.engine.llm.policy,
        }
        return _respond(request, {"object": "list", "data": [card]})

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        req = await self._body(request, CompletionRequest)
        self._check_common(req, req.model)
        if len(req.prompts) > self.config.limits.max_prompts:
            raise HTTPError(
                400, f"prompt: more than {self.config.limits.max_prompts} prompts", field="prompt"
            )
        sampling = req.sampling(DEFAULT_COMPLETION_MAX_TOKENS)
        if req.stream:
            return await self._stream(request, req.prompts[0], sampling, req, chat=False)
        responses = [self.engine.generate.remote(p, sampling, req.policy) for p in req.prompts]
        try:
            outs = await asyncio.gather(*responses)
        except BaseException as e:  # one prompt failed (or the client left): stop the other generations
            for response in responses:
                response.cancel()
            if isinstance(e, Exception):
                raise to_http_error(e, "prompt") from None
            raise
        choices = [
            {
                "index": i,
                "text": o["text"],
                "finish_reason": o["finish_reason"],
                "logprobs": None,
                "stats": o["stats"],
            }
            for i, o in enumerate(outs)
        ]
        return _respond(request, self._completion_body("text_completion", choices, outs))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        req = await self._body(request, ChatCompletionRequest)
        self._check_common(req, req.model)
        sampling = req.sampling(DEFAULT_CHAT_MAX_TOKENS)
        if req.stream:
            return await self._stream(request, req.chat(), sampling, req, chat=True)
        try:
            out = await self.engine.generate.remote(req.chat(), sampling, req.policy)
        except Exception as e:
            raise to_http_error(e, "messages") from None
        message = {"role": "assistant", "content": out["text"]}
        choices = [
            {"index": 0, "message": message, "finish_reason": out["finish_reason"], "stats": out["stats"]}
        ]
        return _respond(request, self._completion_body("chat.completion", choices, [out]))

    def _completion_body(
        self, obj: str, choices: list[dict[str, Any]], outs: list[dict[str, Any]]
    ) -> dict[str, Any]:
        prompt_tokens = sum(int(o.get("prompt_tokens") or 0) for o in outs)
        completion_tokens = sum(int(o.get("completion_tokens") or 0) for o in outs)
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": obj,
            "created": int(time.time()),
            "model": self.config.model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "entropyinfer": outs[0].get("stats", {}),
        }

    async def _stream(
        self,
        request: Request,
        prompt: Any,
        sampling: dict[str, Any],
        req: CompletionRequest | ChatCompletionRequest,
        chat: bool,
    ) -> Response:
        """SSE: the request is validated (first `accepted` event) before the 200 goes out."""
        gen = cast(
            DeploymentResponseGenerator[Any],
            self.engine.options(stream=True).run.remote(prompt, sampling, req.policy, True),
        )
        try:
            first = await gen.__anext__()
        except Exception as e:
            gen.cancel()
            raise to_http_error(e, "messages" if chat else "prompt") from None
        prompt_tokens = int(first.get("prompt_tokens") or 0)
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        model = self.config.model_name
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if text:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            body = {"id": cid, "object": obj, "created": created, "model": model, "choices": [choice]}
            return f"data: {wire.encode(body, 'json').decode()}\n\n"

        async def events() -> AsyncIterator[str]:
            finished = False
            try:
                if chat:
                    yield chunk(None, None, role=True)
                async for ev in gen:
                    if ev["type"] == "token":
                        yield chunk(ev["text"], None)
                    elif ev["type"] == "final":
                        finished = True
                        yield chunk(None, ev["finish_reason"])
                        if req.include_usage:
                            n = int(ev.get("completion_tokens") or 0)
                            usage = {
                                "prompt_tokens": prompt_tokens,
                                "completion_tokens": n,
                                "total_tokens": prompt_tokens + n,
                            }
                            body = {
                                "id": cid,
                                "object": obj,
                                "created": created,
                                "model": model,
                                "choices": [],
                                "usage": usage,
                            }
                            yield f"data: {wire.encode(body, 'json').decode()}\n\n"
                yield "data: [DONE]\n\n"
            except Exception as e:
                err = to_http_error(e, "messages" if chat else "prompt")
                yield f"data: {wire.encode(err.body(), 'json').decode()}\n\n"
            finally:
                if not finished:
                    gen.cancel()

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    # ---- document jobs ------------------------------------------------------------------------------

    @app.post("/v1/jobs")
    async def create_job(self, request: Request) -> Response:
        req = await self._body(request, JobRequest)
        self._check_common(req)
        limits = self.config.limits
        docs, questions = req.documents, req.question_list
        if len(docs) > limits.max_batch_documents:
            raise HTTPError(
                400,
                f"documents: {len(docs)} documents exceed the batch limit of {limits.max_batch_documents}",
                field="documents",
            )
        if len(questions) > limits.max_questions:
            raise HTTPError(400, f"questions: more than {limits.max_questions} questions", field="questions")
        key = req.idempotency_key or request.headers.get("idempotency-key") or None
        params: dict[str, Any] = {"sampling": req.sampling(DEFAULT_JOB_MAX_TOKENS), "policy": req.policy}
        named = [(d.name, d.text) for d in docs]
        if key is not None:
            try:
                existing = await asyncio.to_thread(
                    self.store.lookup_key, key, request_digest(named, questions, params)
                )
            except IdempotencyConflict as e:
                raise HTTPError(409, str(e), "conflict", "idempotency_key") from None
            if existing is not None:
                return _respond(request, {**existing.to_dict(), "created": False}, 200)
        # Each document's tokens once (with an empty question), each question's once (with an empty
        # document), and the template's own: a (document, question) prompt has n_doc + n_q - n_template
        # tokens. Never a prompt per pair: that is a copy of every document per question.
        prompts = [self.worker.prompt(text, "") for _, text in named]
        prompts += [self.worker.prompt("", q) for q in questions]
        prompts.append(self.worker.prompt("", ""))
        try:
            counts = await self.engine.count_tokens.remote(prompts)
            max_context = int((await self._info())["max_context"])
        except Exception as e:
            raise to_http_error(e, "documents") from None
        del prompts
        doc_counts, question_counts, template = counts[: len(named)], counts[len(named) : -1], counts[-1]
        max_tokens = params["sampling"]["max_tokens"]
        new_docs = []
        for i, (name, text) in enumerate(named):
            tokens = tuple(doc_counts[i] + n - template for n in question_counts)
            if max(tokens) + max_tokens > max_context:
                raise HTTPError(
                    400,
                    f"documents[{i}]: {max(tokens)} prompt tokens with the question; with "
                    f"max_tokens={max_tokens} this exceeds the model's context of {max_context} tokens",
                    field=f"documents[{i}]",
                )
            new_docs.append(NewDocument(text, name, tokens))
        try:
            job, created = await asyncio.to_thread(
                self.store.submit, NewJob(tuple(new_docs), tuple(questions), params), key
            )
        except IdempotencyConflict as e:
            raise HTTPError(409, str(e), "conflict", "idempotency_key") from None
        self.worker.notify()
        self.metrics.queue_length.set(await asyncio.to_thread(self.store.queue_length))
        return _respond(request, {**job.to_dict(), "created": created}, 201 if created else 200)

    async def _job_or_404(self, job_id: str) -> Any:
        job = await asyncio.to_thread(self.store.get, job_id)
        if job is None:
            raise HTTPError(404, f"job_id: no job {job_id!r} (unknown or expired)", "not_found", "job_id")
        return job

    @app.get("/v1/jobs/{job_id}")
    async def get_job(self, job_id: str, request: Request) -> Response:
        return _respond(request, (await self._job_or_404(job_id)).to_dict())

    @app.get("/v1/jobs/{job_id}/results")
    async def job_results(self, job_id: str, request: Request) -> Response:
        job = await self._job_or_404(job_id)
        results = await asyncio.to_thread(self.store.results, job_id)
        return _respond(
            request,
            {"object": "job.results", "job": job.to_dict(), "complete": job.finished, "results": results},
        )

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(self, job_id: str, request: Request) -> Response:
        await self._job_or_404(job_id)
        job = await asyncio.to_thread(self.store.cancel, job_id)
        return _respond(request, job.to_dict() if job is not None else {})

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
    async def not_found(self, path: str, request: Request) -> Response:
        raise HTTPError(404, f"no route /{path}", "not_found", "path")
