"""Routes: models and versions addressed by path, operation settings from the query."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest

from service.media import JSON, NPY
from service.runtime import CPU
from tests.service.conftest import (
    LATENT,
    NEWEST,
    VERSIONS,
    f32,
)

pytestmark = pytest.mark.anyio


async def test_newest_version_is_numeric_and_each_version_is_addressable(client: httpx.AsyncClient) -> None:
    info = (await client.get("/v1/models/tiny")).json()
    assert info["version"] == NEWEST
    assert info["versions"] == list(VERSIONS)
    assert info["latent_dim"] == LATENT and info["input_shape"] == [1, 28, 28]
    assert info["providers"] == [CPU]
    assert info["graph_providers"] == {"encoder": [CPU], "decoder": [CPU]}
    assert {"name", "likelihood", "dataset", "metrics", "architecture"} <= info.keys()
    pinned = (await client.get("/v1/models/tiny/versions/2")).json()
    assert pinned["version"] == "2"
    listing = (await client.get("/v1/models")).json()
    assert [m["version"] for m in listing["models"]] == [NEWEST]

    request = {"n": 2, "seed": 5}
    newest = (await client.post("/v1/models/tiny/sample", json=request)).json()
    ten = (await client.post(f"/v1/models/tiny/versions/{NEWEST}/sample", json=request)).json()
    two = (await client.post("/v1/models/tiny/versions/2/sample", json=request)).json()
    assert newest == ten
    assert newest["z"] == two["z"]  # same eps ...
    assert not np.allclose(f32(newest["samples"]), f32(two["samples"]))  # ... different decoders


URL = "/v1/models/tiny"


def load_npy(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == NPY
    array: np.ndarray = np.load(io.BytesIO(response.content), allow_pickle=False)
    return array


async def test_sample_parameters_in_the_query_without_a_body(client: httpx.AsyncClient) -> None:
    response = await client.post(
        f"{URL}/sample?n=2&seed=8&temperature=0.5&dtype=uint8", headers={"Accept": NPY}
    )
    from_body = await client.post(
        f"{URL}/sample",
        json={"n": 2, "seed": 8, "temperature": 0.5, "dtype": "uint8"},
        headers={"Accept": NPY},
    )
    np.testing.assert_array_equal(load_npy(response), load_npy(from_body))
    whitespace_body = await client.post(
        f"{URL}/sample?n=2&seed=8&temperature=0.5&dtype=uint8",
        content=b" \r\n\t",
        headers={"Accept": NPY, "Content-Type": JSON},
    )
    np.testing.assert_array_equal(load_npy(whitespace_body), load_npy(from_body))


async def test_query_parameters_join_a_json_body_and_win_over_it(client: httpx.AsyncClient) -> None:
    """A saved body can be re-run with `?seed=...`: both sources are read, the query string wins."""
    merged = await client.post(f"{URL}/sample?seed=8&dtype=uint8", json={"n": 2, "seed": 1})
    assert merged.status_code == 200
    body = {"n": 2, "seed": 8, "dtype": "uint8"}
    assert merged.json() == (await client.post(f"{URL}/sample", json=body)).json()


async def test_integral_floats_are_integers_as_json_schema_says(client: httpx.AsyncClient) -> None:
    as_float = await client.post(f"{URL}/sample", json={"n": 3.0, "seed": 5.0})
    assert as_float.status_code == 200
    assert as_float.json() == (await client.post(f"{URL}/sample", json={"n": 3, "seed": 5})).json()
