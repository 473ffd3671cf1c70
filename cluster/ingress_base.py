"""What every route of the HTTP ingress shares: the FastAPI `app` (its API-key dependency and error
handlers), and `IngressBase`, the ingress replica's state (config, engine handle, keys, admission, the job
store and its worker) with the helpers routes use: reading a body, the engine's info and status within a
time bound, the config's limits on a request. The routes are in cluster/ingress.py (completions, health,
models) and cluster/job_routes.py (document jobs), as methods of the `Ingress` deployment.
"""

# No `from __future__ import annotations` here: FastAPI reads the dependency's annotations at runtime.
import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar, cast

from fastapi import Depends, FastAPI
from fastapi import Request as HTTPRequest
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from entropyinfer.cluster.admission import Admission
from entropyinfer.cluster.auth import KeyRing
from entropyinfer.cluster.config import ServeAppConfig, app_config
from entropyinfer.cluster.http_errors import HTTPError, install_handlers, to_http_error
from entropyinfer.cluster.job_store import JobStore
from entropyinfer.cluster.job_tasks import EngineStream
from entropyinfer.cluster.job_worker import JobWorker
from entropyinfer.cluster.metrics import JobMetrics
from entropyinfer.cluster.ray_errors import engine_unavailable
from entropyinfer.cluster.replica import EngineInfo, EngineStatus
from entropyinfer.cluster.schemas import SamplingFields, read_body

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
    ingress: IngressBase = serve.get_replica_context().servable_object  # type: ignore[assignment]
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


class IngressBase:
    """The ingress replica's state and the helpers its routes share (`Ingress` extends it)."""

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

    async def _status(self) -> EngineStatus:
        """The engine replica's live status (bounded in time, never cached); a 503 if it does not answer."""
        try:
            status: EngineStatus = await _bounded(
                self.engine.status.remote(), self.health_timeout_s, "the health check"
            )
        except Exception as e:
            raise HTTPError(503, f"engine not ready: {type(e).__name__}", "unavailable") from None
        return status
