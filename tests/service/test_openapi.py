"""The OpenAPI document describes every operation, its bodies, parameters and errors."""

from __future__ import annotations

import httpx
import pytest

from service.media import NPY, PNG

pytestmark = pytest.mark.anyio


async def test_openapi_documents_every_operation(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    for op in ("encode", "sample", "reconstruct", "decode"):
        for path in (f"/v1/models/{{model}}/{op}", f"/v1/models/{{model}}/versions/{{version}}/{op}"):
            operation = spec["paths"][path]["post"]
            body = operation["requestBody"]["content"]["application/json"]["schema"]
            assert body["properties"], path
            assert all(
                "description" in prop or "$ref" in prop or "anyOf" in prop
                for prop in body["properties"].values()
            )
            assert {"200", "404", "422"} <= operation["responses"].keys()
    encode = spec["paths"]["/v1/models/{model}/encode"]["post"]
    assert NPY in encode["requestBody"]["content"]
    assert NPY in encode["responses"]["200"]["content"]
    sample = spec["paths"]["/v1/models/{model}/sample"]["post"]
    assert PNG in sample["responses"]["200"]["content"]
    assert {"X-Seed", "X-Grid-Rows", "X-Grid-Cols"} <= sample["responses"]["200"]["headers"].keys()
    # the configured limits (conftest: MAX_SAMPLES=2048, MAX_BATCH=16), in the body and the query
    assert (
        sample["requestBody"]["content"]["application/json"]["schema"]["properties"]["n"]["maximum"] == 2048
    )
    assert next(p for p in sample["parameters"] if p["name"] == "n")["schema"]["maximum"] == 2048
    assert (
        encode["requestBody"]["content"]["application/json"]["schema"]["properties"]["inputs"]["maxItems"]
        == 16
    )
    assert (await client.get("/docs")).status_code == 200


async def test_operation_routes_document_their_path_parameters(client: httpx.AsyncClient) -> None:
    """The operation routes bypass FastAPI's dependency solving; their path parameters stay documented."""
    spec = (await client.get("/openapi.json")).json()
    for path, expected in (
        ("/v1/models/{model}/decode", {"model"}),
        ("/v1/models/{model}/versions/{version}/decode", {"model", "version"}),
    ):
        parameters = spec["paths"][path]["post"]["parameters"]
        assert {p["name"] for p in parameters if p["in"] == "path"} == expected, path
