"""The HTTP ingress deployment (FastAPI): the routes of the OpenAI-compatible completions, health, metrics
and models; the document-job routes are cluster/job_routes.py's, the shared app, state and helpers
cluster/ingress_base.py's (`Ingress` extends both).

A route reads and validates its body (cluster/schemas.py: the SamplingParams is built there), sends the engine
replica a typed `events.Request` and reads its typed events back (cluster/events.py); the OpenAI bodies
and SSE chunks are shaped in cluster/openai_format.py, errors in cluster/http_errors.py. The API key is
checked once for every route but /healthz (an app-level dependency). The ingress also owns the SQLite
job store and runs the job worker (cluster/job_worker.py) as a background task; its replicas run on the
head node, where the store's file is.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at runtime.
import asyncio
import secrets
from collections.abc import Awaitable
from typing import TypeVar, cast

from fastapi import Request as HTTPRequest
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentResponse, DeploymentResponseGenerator

from entropyinfer.cluster import openai_format
from entropyinfer.cluster.choices import engine_requests, score_only
from entropyinfer.cluster.deadline import Deadline, within
from entropyinfer.cluster.engine_health import CONTENT_TYPE, engine_summary, prometheus_text
from entropyinfer.cluster.events import Accepted, Error, Event, Final, Prompt, Request
from entropyinfer.cluster.http_errors import (
    HTTPError,
    rejected,
    respond,
    to_http_error,
)
from entropyinfer.cluster.ingress_base import (  # re-exported: the app and its constants live there
    HEAD_NODE_RESOURCE,
    HEALTH_TIMEOUT_S,
    INFO_TIMEOUT_S,
    PUBLIC_PATHS,
    app,
)
from entropyinfer.cluster.job_routes import JobRoutes
from entropyinfer.cluster.policy_routes import PolicyRoutes
from entropyinfer.cluster.replica import EngineStatus
from entropyinfer.cluster.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from entropyinfer.cluster.sse import sse_events

__all__ = ["HEALTH_TIMEOUT_S", "INFO_TIMEOUT_S", "PUBLIC_PATHS", "Ingress", "app"]

T = TypeVar("T")


def _request(prompt: Prompt, req: SamplingFields, stream: bool = False) -> Request:
    return Request(secrets.token_hex(16), prompt, req.sampling_params, req.policy, stream)


async def _awaited(response: Awaitable[T]) -> T:
    return await response


# Serve pickles the class when it is decorated: what its methods use must be defined above it (or be
# importable, as its bases are).
@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}})
@serve.ingress(app)
class Ingress(JobRoutes, PolicyRoutes):
    """The HTTP ingress: completions, health, metrics and models here; document jobs in JobRoutes; the
    state and shared helpers in IngressBase."""

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

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
    async def not_found(self, path: str, request: HTTPRequest) -> Response:
        raise HTTPError(404, f"no route /{path}", "not_found", "path")
