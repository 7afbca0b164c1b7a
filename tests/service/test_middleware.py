"""One middleware stack for both paths: every middleware wraps operations and FastAPI's routes alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from service.access import ApiKeys
from service.app import ServiceApp, create_app
from service.middleware import BodySizeLimit, ErrorBoundary, RequestMetrics
from service.v2_errors import V2ErrorShape
from tests.service.conftest import make_settings
from tests.service.stack import built_stack, chain, find_dispatch, one_path_only

pytestmark = pytest.mark.anyio


class Recorder:
    """A middleware that notes the path of every request it wraps."""

    def __init__(self, app: ASGIApp, seen: list[str]) -> None:
        self.app = app
        self.seen = seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.seen.append(f"{scope['method']} {scope['path']}")
        await self.app(scope, receive, send)


def test_both_paths_cross_the_same_middlewares_and_nothing_else(model_dir: Path) -> None:
    """Above the dispatch: the service's middlewares, once each. Below it, on the operations' path: nothing
    between the dispatch and the handler; on FastAPI's path: only FastAPI's own machinery, then its router."""
    app = create_app(make_settings(model_dir))
    stack = chain(built_stack(app))
    expected = [ErrorBoundary, V2ErrorShape, RequestMetrics, ApiKeys, BodySizeLimit]
    assert [type(layer) for layer in stack[:-1]] == expected
    assert one_path_only(find_dispatch(app)) == []


@pytest.mark.parametrize("side", ["operations", "fastapi"])
def test_the_check_above_fails_for_a_middleware_on_one_path_only(model_dir: Path, side: str) -> None:
    dispatch = find_dispatch(create_app(make_settings(model_dir)))
    if side == "fastapi":
        dispatch.framework = Recorder(dispatch.framework, [])
    else:
        route = dispatch._routes["sample"][0]
        route.app = Recorder(route.app, [])
    assert [text.split()[0] for text in one_path_only(dispatch)] == ["Recorder"]


async def test_a_middleware_added_later_wraps_operations_and_fastapi_routes_alike(model_dir: Path) -> None:
    app: ServiceApp = create_app(make_settings(model_dir))
    seen: list[str] = []
    app.add_middleware(Recorder, seen=seen)
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/v1/models/tiny/sample", {"json": {"n": 1, "seed": 1}}),  # an operation, 200
        ("POST", "/v1/models/tiny/versions/2/decode", {"json": {"z": [[0.0]]}}),  # an operation, 422
        ("POST", "/v1/models/nope/encode", {"json": {}}),  # an operation's route, 404
        ("GET", "/v1/models/tiny", {}),  # FastAPI, 200
        ("GET", "/v1/models/tiny/sample", {}),  # FastAPI, 405
        ("GET", "/nowhere", {}),  # FastAPI, 404
    ]
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        statuses = [(await client.request(m, path, **kw)).status_code for m, path, kw in requests]
    assert statuses == [200, 422, 404, 200, 405, 404]
    assert seen == [f"{method} {path}" for method, path, _ in requests]


async def test_a_bug_in_a_middleware_is_a_500_in_the_error_shape(model_dir: Path) -> None:
    """The error boundary stays above every middleware, those added later too."""

    class Broken:
        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                raise RuntimeError("a bug")
            await self.app(scope, receive, send)

    app = create_app(make_settings(model_dir))
    app.add_middleware(Broken)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
    ):
        for response in (await client.get("/healthz"), await client.post("/v1/models/tiny/sample", json={})):
            assert response.status_code == 500
            assert response.json()["error"]["message"] == "internal error; the server log has the details"
        v2 = await client.post("/v2/models/tiny.sample/infer", json={"inputs": []})
        assert v2.status_code == 500
        assert v2.json() == {"error": "internal error; the server log has the details"}  # the V2 shape
