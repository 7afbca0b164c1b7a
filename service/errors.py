"""One error type, one error shape.

Every error the service returns, whether raised by our code, by FastAPI's validation or by Starlette's
routing, renders as

    {"error": {"status": 422, "field": "inputs.3.12", "message": "expected a number in [0, 1], got 1.5"}}

`field` is the dotted path of the offending request part (`body` for the body as a whole, null when no
single field is to blame). The hierarchy:

    ServiceError            status, field, message, headers
     ├── BadRequest          400  the body cannot be parsed at all (malformed JSON, broken .npy)
     ├── Unauthorized        401  no valid API key (API_KEYS set), with WWW-Authenticate
     ├── Forbidden           403  not allowed even with a key (admin routes without API_KEYS)
     ├── NotFound            404  unknown model or version
     ├── NotAcceptable       406  no response type the client accepts
     ├── PayloadTooLarge     413  body over MAX_BODY_BYTES
     ├── UnsupportedMedia    415  request Content-Type we do not read
     └── InvalidInput        422  parsed, but a field is wrong (shape, range, limit, type)

The batcher's own exceptions are rendered here too: BatcherOverloaded -> 503 with Retry-After,
BatcherClosed -> 503, BatchFailed -> 500 (logged with its cause; every caller in the batch gets it).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from service.batching import BatcherClosed, BatcherOverloaded, BatchFailed

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error with an HTTP status, the request field it concerns and a message a client can act on."""

    status = 500

    def __init__(
        self, message: str, *, field: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.headers = headers or {}

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle with field and headers (a body parsed in another process raises it there)."""
        return (_rebuild, (type(self), self.message, self.field, self.headers))


def _rebuild(
    cls: type[ServiceError], message: str, field: str | None, headers: dict[str, str]
) -> ServiceError:
    return cls(message, field=field, headers=headers)


class BadRequest(ServiceError):
    status = 400


class Unauthorized(ServiceError):
    status = 401


class Forbidden(ServiceError):
    status = 403


class NotFound(ServiceError):
    status = 404


class NotAcceptable(ServiceError):
    status = 406


class PayloadTooLarge(ServiceError):
    status = 413


class UnsupportedMedia(ServiceError):
    status = 415


class InvalidInput(ServiceError):
    status = 422


def error_body(status: int, message: str, field: str | None = None) -> bytes:
    return orjson.dumps({"error": {"status": status, "field": field, "message": message}})


def error_response(
    status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        error_body(status, message, field), status_code=status, headers=headers, media_type="application/json"
    )


def dotted(loc: tuple[int | str, ...] | list[int | str]) -> str:
    """("body", "inputs", 3, 12) -> "inputs.3.12": the body prefix is implied; query/path prefixes are kept."""
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(str(p) for p in parts) or "body"


def render(exc: Exception, path: str) -> Response:
    """The response for any exception raised while serving `path`: one place for both entry points (FastAPI's
    exception handlers and the operations' fast path, `service.dispatch`)."""
    if isinstance(exc, ServiceError):
        return error_response(exc.status, exc.message, exc.field, exc.headers)
    if isinstance(exc, RequestValidationError):
        first: dict[str, Any] = exc.errors()[0]
        return error_response(422, str(first.get("msg", "invalid value")), dotted(first.get("loc", ())))
    if isinstance(exc, StarletteHTTPException):  # Starlette's own 404 (no such route) and 405 (wrong method)
        return error_response(exc.status_code, str(exc.detail), None, dict(exc.headers or {}))
    if isinstance(exc, BatcherOverloaded):
        retry_after = max(1, math.ceil(exc.retry_after_s))
        message = f"the model queue is full ({exc}); retry after {retry_after} s"
        return error_response(503, message, None, {"Retry-After": str(retry_after)})
    if isinstance(exc, BatcherClosed):
        return error_response(503, "the service is shutting down", None, {"Retry-After": "1"})
    if isinstance(exc, BatchFailed):
        log.error("model run failed on %s: %s", path, exc, exc_info=exc.__cause__ or exc)
        return error_response(500, "the model run failed; the server log has the details")
    # A bug, not a client mistake: the caller re-raises after sending this, so uvicorn logs the traceback.
    return error_response(500, "internal error; the server log has the details")


EXPECTED = (
    ServiceError,
    RequestValidationError,
    StarletteHTTPException,
    BatcherOverloaded,
    BatcherClosed,
    BatchFailed,
)
"""The exceptions `render` answers in full; anything else is a bug and is re-raised after its 500."""


async def _handle(request: Request, exc: Exception) -> Response:
    return render(exc, request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    for kind in (*EXPECTED, Exception):
        app.add_exception_handler(kind, _handle)


def check_limit(value: int, limit: int, field: str, setting: str, what: str) -> None:
    """Refuse a count past a configured limit, naming the setting that bounds it."""
    if value > limit:
        raise InvalidInput(f"{what} is {value}; the limit ({setting}) is {limit}", field=field)
