"""The hot path: model operations go from uvicorn straight to their routes, past FastAPI's application stack.

FastAPI declares and documents every route and serves everything that is not a model operation (metadata,
health, metrics, /docs). Its application stack, though (ServerErrorMiddleware, FastAPI's telemetry and
body-limit middlewares, ExceptionMiddleware, AsyncExitStackMiddleware, the router's scan of every route),
cost about 35 us of CPU per `sample n=1` request: 143-154 us through it against 107-122 us along this path
(32 at a time, in-process; `python -m bench.serve_costs`, figures in README.md's Performance section), twice
the model's share of the request. None of it does anything for an operation, whose route reads its own
body and returns its own Response.

`OperationDispatch.match` claims a request when it is a POST that one of the operation routes matches in
full (Starlette's own matching, so paths and parameters mean the same as through FastAPI); anything else,
a wrong method on an operation's path included, goes to FastAPI. A claimed request runs under the same
two middlewares as the rest (metrics outermost, then the body limit) and its errors are rendered by the
same `errors.render`, so nothing a client sees depends on which path served it.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence

from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import Message, Receive, Scope, Send

from service.errors import EXPECTED, render
from service.metrics import Metrics, RequestMetrics
from service.middleware import BodySizeLimit


class OperationDispatch:
    """ASGI app for the model operation routes (see the module docstring); `match` says which requests."""

    def __init__(
        self,
        routes: Sequence[APIRoute],
        *,
        metrics: Metrics,
        known_models: Callable[[], Container[str]],
        max_body_bytes: int,
    ) -> None:
        # The operation is the path's last segment: at most two routes (newest, pinned) to try per request.
        self._routes: dict[str, list[APIRoute]] = {}
        for route in routes:
            self._routes.setdefault(route.path.rpartition("/")[2], []).append(route)
        self._app = RequestMetrics(BodySizeLimit(self._run, max_bytes=max_body_bytes), metrics, known_models)

    def match(self, scope: Scope) -> bool:
        """True for a POST to an operation route, with `route` and `path_params` added to `scope`."""
        if scope["type"] != "http" or scope["method"] != "POST":
            return False
        for route in self._routes.get(scope["path"].rpartition("/")[2], ()):
            match, child_scope = route.matches(scope)
            if match is Match.FULL:
                scope.update(child_scope)
                return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)

    async def _run(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await scope["route"].app(scope, receive, tracking_send)
        except Exception as exc:
            if started:  # too late for an error response; uvicorn logs it and closes the connection
                raise
            await render(exc, scope["path"])(scope, receive, send)
            if not isinstance(exc, EXPECTED):
                raise  # a bug: uvicorn logs the traceback, as after Starlette's ServerErrorMiddleware
