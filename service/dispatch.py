"""The model operations' short path to their handlers, inside the one middleware stack every request crosses.

FastAPI declares and documents every route and serves everything that is not a model operation (metadata,
health, metrics, /docs). Its per-request machinery (exception middlewares, the exit stack, the router's scan
of every route, dependency solving) does nothing for an operation, whose handler reads its own body and
returns its own Response, yet it costs more CPU than the operation's share of the model run
(`python -m bench.serve_costs` measures both paths). So the app's stack (`ServiceApp.build_middleware_stack`)
ends in an `OperationDispatch`: below every middleware, a POST that an operation route matches in full goes
straight to that route; every other request goes on to FastAPI's machinery and router.

Because the split is below the middlewares, whatever the app adds with `add_middleware` (metrics, the body
limit, later authentication, CORS, tracing) wraps both paths alike. Errors on the short path are rendered
by the same `errors.render` as FastAPI's exception handlers use, so nothing a client sees depends on which
path served it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.catalog import ServedModel
from service.errors import EXPECTED, error_response, render

Operation = Callable[[Request, ServedModel], Awaitable[Response]]
"""A model operation's handler: the request and the model version it addresses -> its response."""
Resolve = Callable[[Request], ServedModel]
"""The dependency that finds the model version a request's path names (or raises NotFound)."""


class OperationRoute(APIRoute):
    """A model operation's route: documented by FastAPI like any other, served by `OperationDispatch`.

    FastAPI builds the OpenAPI entry from the route arguments (`service.openapi` writes the parameters and
    body). At request time the route calls `resolve(request)` and `endpoint(request, served)` itself, and
    renders what they raise as FastAPI's exception handlers would: they raise before any response starts.
    A bug propagates to the stack's `ErrorBoundary`.
    """

    def __init__(self, path: str, endpoint: Operation, *, resolve: Resolve, **kwargs: Any) -> None:
        super().__init__(path, endpoint, methods=["POST"], **kwargs)

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            watch = DisconnectWatch(receive)
            request = Request(scope, watch.receive, send)
            try:
                response = await endpoint(request, resolve(request))
            except EXPECTED as exc:
                response = render(exc, scope["path"])
            except asyncio.CancelledError:
                if not watch.disconnected:
                    raise
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                response = error_response(CLIENT_CLOSED, "the client closed the connection")
            finally:
                watch.stop()
            await response(scope, receive, send)

        self.app = app


CLIENT_CLOSED = 499
"""nginx's status for a request whose client went away: counted in the metrics, sent to nobody."""


class DisconnectWatch:
    """Cancels the request's task when its client disconnects after sending the body, so a request nobody
    waits for leaves the batch queue before it runs (the batcher drops a cancelled caller's rows).

    The handler reads its body through `receive`; once the last body message has passed, one more
    `receive()` on the server's channel returns only when the client disconnects (or the response is done,
    by which time the watch has stopped).
    """

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task: asyncio.Task[None] | None = None
        self.disconnected = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request" and not message.get("more_body", False) and self._task is None:
            self._task = asyncio.create_task(self._watch(asyncio.current_task()))
        elif message["type"] == "http.disconnect":
            self.disconnected = True
        return message

    async def _watch(self, request_task: asyncio.Task[Any] | None) -> None:
        message = await self._receive()
        if message["type"] == "http.disconnect" and request_task is not None:
            self.disconnected = True
            request_task.cancel()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


class OperationDispatch:
    """Send model operations to their routes and everything else to `framework` (see the module docstring)."""

    def __init__(self, routes: Sequence[OperationRoute], framework: ASGIApp) -> None:
        # The operation is the path's last segment: at most two routes (newest, pinned) to try per request.
        self._routes: dict[str, list[OperationRoute]] = {}
        for route in routes:
            self._routes.setdefault(route.path.rpartition("/")[2], []).append(route)
        self.framework = framework

    def match(self, scope: Scope) -> OperationRoute | None:
        """The operation route a POST matches in full, with `route` and `path_params` added to `scope`."""
        if scope["type"] != "http" or scope["method"] != "POST":
            return None
        for route in self._routes.get(scope["path"].rpartition("/")[2], ()):
            match, child_scope = route.matches(scope)
            if match is Match.FULL:
                scope.update(child_scope)
                return route
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.match(scope)
        await (self.framework if route is None else route.app)(scope, receive, send)
