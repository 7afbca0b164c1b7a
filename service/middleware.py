"""The middleware stack every request crosses, model operations and FastAPI's routes alike.

The stack, outermost first:

    ErrorBoundary     a 500 in the error shape for a bug anywhere below, then re-raised (uvicorn logs it)
    CORSMiddleware    CORS_ORIGINS' preflights and headers (Starlette's; only when configured)  }
    RequestMetrics    counts and times every response, 401s and 413s included                  } `install_
    ApiKeys           401 without a valid key when API_KEYS is set (`service.access`)           } middleware`
    BodySizeLimit     413 before a handler reads a body over MAX_BODY_BYTES                    }
    OperationDispatch model operations to their routes, the rest to FastAPI (`service.dispatch`)

Middlewares added later with `add_middleware` go above the four in the middle.

Starlette keeps the middle ones in `app.user_middleware`; `ServiceApp.build_middleware_stack` puts the
error boundary above them and the dispatch below them, so a middleware added later with
`app.add_middleware` also wraps both paths.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.access import ApiKeys, parse_api_keys
from service.dispatch import CLIENT_CLOSED
from service.errors import PayloadTooLarge, error_body, render
from service.metrics import Metrics, protocol_of
from service.settings import Settings
from service.v2_errors import v2_response

EXPOSED_HEADERS = ["X-Seed", "X-Grid-Cols", "X-Grid-Rows", "Retry-After", "WWW-Authenticate"]
"""Response headers a browser page on another origin may read."""
UNMATCHED = "<unmatched>"
UNKNOWN_MODEL = "<unknown>"


def install_middleware(
    app: FastAPI, *, settings: Settings, metrics: Metrics, known_models: Callable[[], Container[str]]
) -> None:
    """Add the service's middlewares (each `add_middleware` wraps what is already there)."""
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        ApiKeys,
        keys=parse_api_keys(settings.api_keys.get_secret_value()),
        metrics_open=not settings.metrics_require_key,
    )
    app.add_middleware(RequestMetrics, metrics=metrics, known_models=known_models)
    if origins := settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "Accept"],
            expose_headers=EXPOSED_HEADERS,
        )


class ErrorBoundary:
    """A bug below (any exception not answered yet) becomes a 500 in the error shape, then is re-raised so
    that uvicorn logs its traceback; after a response has started, uvicorn closes the connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            return  # the client left while sending its body: nobody to answer, nothing to log
        except Exception as exc:
            if not started:
                response = render(exc, scope["path"])
                if protocol_of(scope["path"]) == "v2":
                    response = v2_response(response)
                await response(scope, receive, send)
            raise


class RequestMetrics:
    """Counts and times every request by endpoint (the route's name: sample, encode, readyz, ...), model and
    protocol ("v2" for the Open Inference Protocol's /v2 routes, "v1" for the rest: `metrics.protocol_of`).

    The model label is the path's model only when it names a loaded model: arbitrary names in 404s must not
    mint new time series.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, known_models: Callable[[], Container[str]]) -> None:
        self.app = app
        self.metrics = metrics
        self.known_models = known_models

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        except ClientDisconnect:
            status = CLIENT_CLOSED
            raise
        finally:
            route: BaseRoute | None = scope.get("route")
            endpoint = getattr(route, "name", UNMATCHED) if route is not None else UNMATCHED
            model = scope.get("path_params", {}).get("model", "")
            if model and model not in self.known_models():
                model = UNKNOWN_MODEL
            seconds = time.perf_counter() - start
            self.metrics.observe_request(endpoint, model, status, seconds, protocol_of(scope["path"]))
            if key := scope.get("state", {}).get("api_key"):
                self.metrics.count_key(key, status)


class BodySizeLimit:
    """Refuse bodies over `max_bytes`: at once when Content-Length says so, else while counting streamed bytes.

    A chunked upload has no Content-Length, so the count on `receive` is what actually bounds memory; the
    PayloadTooLarge it raises surfaces in the handler reading the body and is rendered like any error.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self._reject(
                        send, 400, "Content-Length is not an integer", "headers.content-length"
                    )
                    return
                if declared > self.max_bytes:
                    await self._reject(send, 413, self._message(declared), "body")
                    return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(self._message(received, at_least=True), field="body")
            return message

        await self.app(scope, counting_receive, send)

    def _message(self, size: int, at_least: bool = False) -> str:
        prefix = "at least " if at_least else ""
        return f"request body is {prefix}{size} bytes; MAX_BODY_BYTES is {self.max_bytes}"

    @staticmethod
    async def _reject(send: Send, status: int, message: str, field: str) -> None:
        body = error_body(status, message, field)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
