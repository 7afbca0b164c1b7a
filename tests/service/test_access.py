"""API keys on every route but the probes, on both paths; their names in metrics; CORS when configured."""

from __future__ import annotations

import logging.config
from pathlib import Path

import httpx
import pytest
from fastapi.responses import JSONResponse

from service.__main__ import logging_config
from service.access import current_key, parse_api_keys
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import make_settings, serve

pytestmark = pytest.mark.anyio

ALICE = "alice-0123456789abcdef"
BOB = "bob-0123456789abcdef00"
KEYS = f"alice:{ALICE}, bob:{BOB}"
GUARDED = [
    ("POST", "/v1/models/tiny/sample", {"n": 1, "seed": 1}),  # an operation: the fast path
    ("POST", "/v1/models/tiny/versions/2/decode", {"z": [[0.0] * 4]}),
    ("GET", "/v1/models", None),  # FastAPI's routes
    ("GET", "/v1/models/tiny", None),
    ("POST", "/v1/models/nope/encode", {}),  # unknown model: 401 before 404, nothing learnt without a key
    ("GET", "/no/such/route", None),
]


@pytest.mark.parametrize(("method", "path", "body"), GUARDED, ids=[f"{m} {p}" for m, p, _ in GUARDED])
async def test_every_api_route_needs_a_key(model_dir: Path, method: str, path: str, body: object) -> None:
    async with serve(model_dir, api_keys=KEYS) as client:
        for headers in (
            {},
            {"Authorization": f"Bearer {ALICE}x"},
            {"X-API-Key": "wrong"},
            {"Authorization": ALICE},
        ):
            response = await client.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["www-authenticate"].startswith("Bearer")
            error = response.json()["error"]
            assert error["status"] == 401 and "API key" in error["message"]
        for headers in ({"Authorization": f"Bearer {ALICE}"}, {"X-API-Key": BOB}):
            response = await client.request(method, path, json=body, headers=headers)
            assert response.status_code != 401, headers


async def test_probes_docs_and_metrics_stay_open(model_dir: Path) -> None:
    async with serve(model_dir, api_keys=KEYS) as client:
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/redoc"):
            assert (await client.get(path)).status_code == 200, path
    async with serve(model_dir, api_keys=KEYS, metrics_require_key=True) as client:
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers={"X-API-Key": ALICE})).status_code == 200


async def test_a_route_added_later_needs_a_key_too(model_dir: Path) -> None:
    app = create_app(make_settings(model_dir, api_keys=KEYS))

    async def later() -> JSONResponse:
        return JSONResponse({"secret": True})

    app.add_api_route("/later", later)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as c,
    ):
        assert (await c.get("/later")).status_code == 401
        assert (await c.get("/later", headers={"X-API-Key": ALICE})).json() == {"secret": True}


async def test_the_key_name_labels_metrics_and_the_key_never_appears(model_dir: Path) -> None:
    async with serve(model_dir, api_keys=KEYS) as client:
        await client.post("/v1/models/tiny/sample", json={"n": 1}, headers={"X-API-Key": ALICE})
        await client.post("/v1/models/tiny/sample", json={"n": 0}, headers={"X-API-Key": BOB})
        text = (await client.get("/metrics")).text
    assert 'vae_api_key_requests_total{key="alice",status="200"} 1.0' in text
    assert 'vae_api_key_requests_total{key="bob",status="422"} 1.0' in text
    assert ALICE not in text and BOB not in text


def test_api_keys_from_a_list_or_a_file(tmp_path: Path) -> None:
    assert parse_api_keys("") == {}
    assert parse_api_keys(KEYS) == {ALICE: "alice", BOB: "bob"}
    keys = tmp_path / "keys"
    keys.write_text(f"# the team\nalice:{ALICE}\n\nbob:{BOB}\n")
    assert parse_api_keys(str(keys)) == {ALICE: "alice", BOB: "bob"}


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        (ALICE, "expected NAME:KEY"),
        ("alice:short", "at least 16"),
        (f"alice:{ALICE},alice:{BOB}", "only once"),
        (f"a b:{ALICE}", "expected NAME:KEY"),
    ],
    ids=["no-name", "short-key", "duplicate-name", "bad-name"],
)
def test_malformed_api_keys_are_refused_at_start_without_echoing_keys(spec: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as caught:
        Settings(_env_file=None, api_keys=spec)
    assert ALICE not in str(caught.value) and BOB not in str(caught.value)


async def test_cors_is_off_by_default_and_answers_configured_origins(model_dir: Path) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    async with serve(model_dir) as client:
        response = await client.options("/v1/models/tiny/sample", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    async with serve(model_dir, api_keys=KEYS, cors_origins="https://app.example") as client:
        response = await client.options(
            "/v1/models/tiny/sample", headers={**preflight, "Access-Control-Request-Headers": "x-api-key"}
        )
        assert response.status_code == 200  # a preflight carries no key
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        refused = await client.post(
            "/v1/models/tiny/sample", json={}, headers={"Origin": "https://app.example"}
        )
        assert refused.status_code == 401  # the page can read why
        assert refused.headers["access-control-allow-origin"] == "https://app.example"
        other = await client.options(
            "/v1/models/tiny/sample", headers={**preflight, "Origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in other.headers


def test_the_access_log_names_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    """The access line ends with the key's name, set for the request by the ApiKeys middleware."""
    logging.config.dictConfig(logging_config("info"))
    access = logging.getLogger("uvicorn.access")
    token = current_key.set("alice")
    try:
        access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "POST", "/v1/models/m/sample", "1.1", 200)
    finally:
        current_key.reset(token)
    access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "GET", "/healthz", "1.1", 200)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].endswith("200 OK key=alice") and lines[-1].endswith("200 OK key=-")
    assert ALICE not in "".join(lines)
