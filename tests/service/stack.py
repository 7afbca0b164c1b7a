"""Walking an app's built middleware stack: the layers every request crosses, and the dispatch below them."""

from __future__ import annotations

from starlette.routing import Router
from starlette.types import ASGIApp

from service.app import ServiceApp
from service.dispatch import OperationDispatch


def chain(app: ASGIApp) -> list[object]:
    """`app` and every layer below it, following the ASGI middleware convention of an `app` attribute, down
    to the dispatch or a router."""
    layers: list[object] = [app]
    while hasattr(layers[-1], "app") and not isinstance(layers[-1], OperationDispatch | Router):
        layers.append(layers[-1].app)  # type: ignore[attr-defined]
    return layers


def built_stack(app: ServiceApp) -> ASGIApp:
    """The stack the app serves with (built now, as Starlette would on the first request)."""
    if app.middleware_stack is None:
        app.middleware_stack = app.build_middleware_stack()
    return app.middleware_stack


def find_dispatch(app: ServiceApp) -> OperationDispatch:
    dispatch = chain(built_stack(app))[-1]
    assert isinstance(dispatch, OperationDispatch), f"the stack ends in {dispatch!r}, not the dispatch"
    return dispatch


FRAMEWORK_LAYERS = {
    "ServerErrorMiddleware",
    "ExceptionTelemetryMiddleware",
    "AppBodyLimitMiddleware",
    "ExceptionMiddleware",
    "AsyncExitStackMiddleware",
}
"""FastAPI's own per-request machinery for its routes: error pages, exception handlers, the exit stack. The
operations' short path does that job itself (`OperationDispatch` renders errors the same way)."""


def one_path_only(dispatch: OperationDispatch) -> list[str]:
    """The middlewares below the dispatch, on one path only: around an operation's handler, or on FastAPI's
    path besides its own machinery. Empty when every middleware wraps both paths."""
    wrapped = [
        f"{type(operation.app).__name__} around {operation.path}"
        for routes in dispatch._routes.values()
        for operation in routes
        if hasattr(operation.app, "app")
    ]
    framework = chain(dispatch.framework)
    assert isinstance(framework[-1], Router), f"FastAPI's path ends in {framework[-1]!r}, not its router"
    return wrapped + [
        type(layer).__name__ for layer in framework[:-1] if type(layer).__name__ not in FRAMEWORK_LAYERS
    ]
