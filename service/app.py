"""The app factory: `create_app(settings)` wires settings, registry, metrics, middleware and routes.

Nothing heavy happens at import or in the factory; the lifespan loads and warms up every model, starts one
batcher per graph, and only then does uvicorn accept connections (so readiness follows warm-up). On
shutdown (SIGTERM included) the lifespan stops the batchers.

Every request crosses the same middleware stack (`service.middleware`); below it, model operations take
their short path to their handlers (`service.dispatch`) and everything else goes on into FastAPI.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp

from service.access import is_open
from service.dispatch import OperationDispatch, OperationRoute
from service.docs import add_docs
from service.errors import install_error_handlers
from service.metrics import Metrics
from service.middleware import ErrorBoundary, install_middleware
from service.openapi import complete
from service.parse_pool import ParsePool
from service.registry import Registry
from service.route_table import add_routes
from service.settings import Settings
from service.v2 import add_v2_routes

DESCRIPTION = """
Serves variational autoencoders exported to ONNX (`MODEL_DIR/NAME/VERSION/{model.json, encoder.onnx,
decoder.onnx}`) with onnxruntime.

* **eps is drawn on the server** from `numpy.random.Generator(PCG64(seed))`, per request and before
  batching: the same seed gives bit-identical eps on any load, in any batch. Requests that draw eps
  without a seed get one drawn from OS entropy, returned as `seed` (and the `X-Seed` header on binary
  responses); decode and reconstruct's mode mean draw no eps and return no seed.
* **Responses**: JSON (default), `Accept: application/x-npy` (one .npy array), or `Accept: image/png`
  (a grid) for image outputs; `dtype: uint8` returns 0-255 pixels.
* **Requests**: JSON, or the array itself as an `application/x-npy` body with parameters in the query.
* **Errors** always look like `{"error": {"status", "field", "message"}}`.
"""


class ServiceApp(FastAPI):
    """FastAPI whose middleware stack ends in the operations' dispatch (`service.dispatch`), and whose
    OpenAPI document also says what the server and its middlewares answer (`service.openapi.complete`)."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            settings: Settings = self.state.settings
            keys = bool(settings.api_keys.get_secret_value())
            metrics_open = not settings.metrics_require_key
            self.openapi_schema = complete(
                super().openapi(), keys=keys, open_paths=lambda path: is_open(path, metrics_open=metrics_open)
            )
        return self.openapi_schema

    def build_middleware_stack(self) -> ASGIApp:
        """The error boundary, every middleware in `user_middleware` (ours and any added later), then the
        dispatch, which sends operations to their routes and the rest to FastAPI's own stack (built here
        without them)."""
        user_middleware, self.user_middleware = self.user_middleware, []
        try:
            framework = super().build_middleware_stack()
        finally:
            self.user_middleware = user_middleware
        routes = [route for route in self.router.routes if isinstance(route, OperationRoute)]
        app: ASGIApp = OperationDispatch(routes, framework)
        for cls, args, kwargs in reversed(user_middleware):
            app = cls(app, *args, **kwargs)
        return ErrorBoundary(app)


def create_app(settings: Settings) -> ServiceApp:
    metrics = Metrics()
    registry = Registry(settings=settings, metrics=metrics)
    parse_pool = ParsePool(settings.parse_workers, settings.parse_offload_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await registry.start()
        await parse_pool.start()
        # What exists now (modules, schemas, sessions) lives as long as the process. Frozen, it is no longer
        # scanned by the cyclic collector, so a full collection under load walks only what requests made.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            await parse_pool.stop()
            await registry.stop()

    app = ServiceApp(
        title="VAE serving",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # service.docs serves /docs and /redoc without a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.parse_pool = parse_pool
    app.state.draining = False  # set by the server on SIGTERM: /readyz answers 503 from then on
    install_error_handlers(app)
    install_middleware(app, settings=settings, metrics=metrics, known_models=registry.model_names)
    add_routes(app, settings)
    add_docs(app)
    add_v2_routes(app, settings)
    return app


def app_from_env() -> ServiceApp:
    """uvicorn factory (`service.app:app_from_env`, factory=True): each worker reads the environment."""
    return create_app(Settings())
