"""The app factory: `create_app(settings)` wires settings, registry, metrics, middleware and routes.

Nothing heavy happens at import or in the factory; the lifespan loads and warms up every model, starts one
batcher per graph, and only then does uvicorn accept connections (so readiness follows warm-up). On
shutdown (SIGTERM included) the lifespan stops the batchers.

A request enters `ServiceApp.__call__`: model operations take the fast path (`service.dispatch`), every
other request FastAPI's usual one.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from service.dispatch import OperationDispatch
from service.errors import install_error_handlers
from service.metrics import Metrics, RequestMetrics
from service.middleware import BodySizeLimit
from service.registry import Registry
from service.routes import OperationRoute, add_routes
from service.settings import Settings

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
    """FastAPI, with the model operations dispatched ahead of its application stack (`service.dispatch`)."""

    dispatch: OperationDispatch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.dispatch.match(scope):
            await self.dispatch(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(settings: Settings) -> ServiceApp:
    metrics = Metrics()
    registry = Registry(settings=settings, metrics=metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await registry.start()
        # What exists now (modules, schemas, sessions) lives as long as the process. Frozen, it is no longer
        # scanned by the cyclic collector, so a full collection under load walks only what requests made.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            await registry.stop()

    app = ServiceApp(title="VAE serving", version="1.0.0", description=DESCRIPTION, lifespan=lifespan)
    install_error_handlers(app)
    # add_middleware wraps what is already there: RequestMetrics ends up outermost, so it sees 413s too.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics, known_models=registry.model_names)
    add_routes(app.router, settings, registry, metrics)
    app.dispatch = OperationDispatch(
        [route for route in app.router.routes if isinstance(route, OperationRoute)],
        metrics=metrics,
        known_models=registry.model_names,
        max_body_bytes=settings.max_body_bytes,
    )
    return app


def app_from_env() -> ServiceApp:
    """uvicorn factory (`service.app:app_from_env`, factory=True): each worker reads the environment."""
    return create_app(Settings())
