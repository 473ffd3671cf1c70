"""HTTP errors of the ingress: the `{"error": {...}}` body, and how engine outcomes map to a status.

Every error is a JSON (or msgpack, per Accept) body `{"error": {"message", "type", "field", "param", "code"}}`
(OpenAI's shape; `param` is OpenAI's name of `field`):
a 4xx names the field to fix (the replica keeps serving), a 503 says to retry later. `to_http_error`
maps what came back from the engine: an `events.Error` (a request the shard rejected: 400 naming its
field) or an exception (Ray's wrappers unwrapped: an engine outage is a 503, a bug a 500). A rank of a
tensor-parallel group that died (`ShardGroupError`) is a 503 naming the rank, with Retry-After: the shard
actor rebuilds the group within seconds.
"""

from __future__ import annotations

import logging
from typing import Literal, TypedDict

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from entropyinfer.cluster import wire
from entropyinfer.cluster.events import Error
from entropyinfer.cluster.ray_errors import engine_unavailable, unwrap
from entropyinfer.errors import ConfigError, RequestCancelled, ShardGroupError

log = logging.getLogger(__name__)

GROUP_RETRY_AFTER_S = 2  # the Retry-After of a 503 from a tensor-parallel group that lost a rank

ErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "not_found",
    "conflict",
    "request_too_large",
    "unsupported_media_type",
    "cancelled",
    "timeout",
    "unavailable",
    "internal_error",
]


class ErrorDetail(TypedDict):
    message: str
    type: ErrorType
    field: str | None
    param: str | None  # OpenAI's name of `field` (the openai client reads it as `APIError.param`)
    code: int


class ErrorBody(TypedDict):
    error: ErrorDetail


class HTTPError(Exception):
    """An error answer: the status, and the body's message, type and field."""

    def __init__(
        self,
        status: int,
        message: str,
        type: ErrorType = "invalid_request_error",
        field: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.field = field
        self.retry_after = retry_after  # seconds: a Retry-After header on the answer

    def body(self) -> ErrorBody:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "field": self.field,
                "param": self.field,
                "code": self.status,
            }
        }


def respond(request: Request, body: object, status: int = 200) -> Response:
    """A body in the format the client's Accept header asks for (JSON by default)."""
    fmt = wire.response_format(request.headers.get("accept"))
    return Response(wire.encode(body, fmt), status_code=status, media_type=wire.media_type(fmt))


def rejected(error: Error, prompt_field: str = "prompt") -> HTTPError:
    """The 400 of a request the shard rejected; a prompt too long names `prompt_field`."""
    field = error.field or prompt_field
    message = error.message.removeprefix(f"{field}: ").removeprefix(f"{field} ")
    return HTTPError(400, f"{field}: {message}", field=field)


def to_http_error(exc: BaseException, prompt_field: str = "prompt") -> HTTPError:
    """Map an engine-side exception to the HTTP error a client sees."""
    exc = unwrap(exc)
    if isinstance(exc, HTTPError):
        return exc
    event = Error.from_exception(exc)  # InvalidRequestError, PromptTooLongError, UnknownPolicyError
    if event is not None:
        return rejected(event, prompt_field)
    if isinstance(exc, ConfigError):
        return HTTPError(400, str(exc))
    if isinstance(exc, RequestCancelled):
        return HTTPError(499, "request cancelled", "cancelled")
    if isinstance(exc, ShardGroupError):
        message = f"engine unavailable: {exc}; the shard group is being rebuilt, retry later"
        return HTTPError(503, message, "unavailable", retry_after=GROUP_RETRY_AFTER_S)
    if engine_unavailable(exc):
        return HTTPError(503, f"engine unavailable: {exc}; retry later", "unavailable")
    log.exception("internal error", exc_info=exc)
    return HTTPError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")


def install_handlers(app: FastAPI) -> None:
    """Every error of the app, FastAPI's and Starlette's own included, as an `ErrorBody`."""

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError) -> Response:
        response = respond(request, exc.body(), exc.status)
        if exc.retry_after is not None:
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request: Request, exc: StarletteHTTPException) -> Response:
        typ: ErrorType = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return respond(request, HTTPError(exc.status_code, str(exc.detail), typ).body(), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        where = errors[0].get("loc", ()) if errors else ()
        field = ".".join(str(x) for x in where if x not in ("body", "query", "path")) or None
        message = f"{field}: {errors[0].get('msg') if errors else exc}"
        return respond(request, HTTPError(400, message, field=field).body(), 400)
