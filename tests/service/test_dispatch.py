"""The operations' short path: which requests it claims, and that errors and metrics look the same through it."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from service import operations
from service.app import create_app
from tests.service.conftest import LATENT, make_settings
from tests.service.stack import find_dispatch

pytestmark = pytest.mark.anyio


def http_scope(method: str, path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "",
        "query_string": b"",
        "headers": [],
    }


@pytest.mark.parametrize(
    ("method", "path", "name", "params"),
    [
        ("POST", "/v1/models/tiny/sample", "sample", {"model": "tiny"}),
        ("POST", "/v1/models/tiny/encode", "encode", {"model": "tiny"}),
        ("POST", "/v1/models/tiny/versions/2/decode", "decode", {"model": "tiny", "version": "2"}),
        (
            "POST",
            "/v1/models/other-name/versions/x/reconstruct",
            "reconstruct",
            {"model": "other-name", "version": "x"},
        ),
        ("GET", "/v1/models/tiny/sample", None, None),
        ("POST", "/v1/models/tiny", None, None),
        ("POST", "/v1/models/tiny/nope", None, None),
        ("POST", "/v1/models/tiny/versions/2/nope", None, None),
        ("POST", "/v1/models/a/b/sample", None, None),
        ("POST", "/healthz", None, None),
    ],
    ids=lambda value: str(value),
)
def test_dispatch_claims_posts_to_operation_routes_only(
    model_dir: Path, method: str, path: str, name: str | None, params: dict[str, str] | None
) -> None:
    dispatch = find_dispatch(create_app(make_settings(model_dir)))
    scope = http_scope(method, path)
    route = dispatch.match(scope)
    assert (route is not None) is (name is not None)
    if name is not None:
        assert route is scope["route"]
        assert scope["route"].name == name
        assert scope["path_params"] == params


@pytest.mark.parametrize("kind", ["lifespan", "websocket"])
def test_dispatch_leaves_other_scope_types_to_fastapi(model_dir: Path, kind: str) -> None:
    dispatch = find_dispatch(create_app(make_settings(model_dir)))
    assert dispatch.match({"type": kind, "path": "/v1/models/tiny/sample"}) is None


async def test_operations_never_enter_fastapis_own_stack(model_dir: Path) -> None:
    """FastAPI's exception middlewares, exit stack and router see every request but the model operations."""
    app = create_app(make_settings(model_dir))
    dispatch = find_dispatch(app)
    seen: list[str] = []
    framework = dispatch.framework

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["path"])
        await framework(scope, receive, send)

    dispatch.framework = recording
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        ok = await client.post("/v1/models/tiny/sample", json={"n": 2, "seed": 1})
        bad = await client.post("/v1/models/tiny/decode", json={"z": [[0.0]]})
        health = await client.get("/healthz")
    assert (ok.status_code, bad.status_code, health.status_code) == (200, 422, 200)
    assert seen == ["/healthz"]


async def test_a_bug_in_an_operation_is_a_500_in_the_error_shape_and_is_counted(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(operations, "sample", broken)
    app = create_app(make_settings(model_dir))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
    ):
        response = await client.post("/v1/models/tiny/sample", json={"n": 1})
        assert response.status_code == 500
        assert response.json() == {
            "error": {
                "status": 500,
                "field": None,
                "message": "internal error; the server log has the details",
            }
        }
        assert (await client.post("/v1/models/tiny/decode", json={"z": [[0.0] * LATENT]})).status_code == 200
        metrics = (await client.get("/metrics")).text
    assert 'vae_requests_total{endpoint="sample",model="tiny",protocol="v1",status="500"} 1.0' in metrics


async def test_a_request_whose_client_left_is_dropped_from_the_queue_before_it_runs(model_dir: Path) -> None:
    """A (a client that waits) holds the decoder's one run; B's client disconnects while B is queued behind
    it: B is answered 499 (to nobody, for the metrics) and its rows never reach a run."""
    app = create_app(make_settings(model_dir, batch_window_ms=0.0))
    async with app.router.lifespan_context(app):
        decoder = app.state.registry.resolve("tiny").decoder
        entered, release = threading.Event(), threading.Event()
        run_rows: list[int] = []
        real_run = decoder._run

        def gated_run(*inputs: Any) -> Any:
            run_rows.append(len(inputs[0]))
            entered.set()
            release.wait(10)
            return real_run(*inputs)

        decoder._run = gated_run
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            a = asyncio.create_task(client.post("/v1/models/tiny/sample", json={"n": 1, "seed": 1}))
            await asyncio.to_thread(entered.wait, 10)

            messages = [{"type": "http.request", "body": b'{"n": 3, "seed": 2}', "more_body": False}]
            left = asyncio.Event()

            async def receive() -> dict[str, Any]:
                if messages:
                    return messages.pop(0)
                await left.wait()
                return {"type": "http.disconnect"}

            sent: list[dict[str, Any]] = []

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            scope = {
                **http_scope("POST", "/v1/models/tiny/sample"),
                "headers": [(b"content-type", b"application/json")],
            }
            b = asyncio.create_task(app(scope, receive, send))
            for _ in range(50):  # let B reach the queue
                await asyncio.sleep(0)
            left.set()
            await asyncio.wait_for(b, 10)
            release.set()
            assert (await a).status_code == 200
            metrics = (await client.get("/metrics")).text
    assert run_rows == [1]  # A's one row; B's three never ran
    assert sent[0]["status"] == 499
    assert 'vae_requests_total{endpoint="sample",model="tiny",protocol="v1",status="499"} 1.0' in metrics
