"""POST .../interpolate: exact endpoints, linear and spherical paths, images or latents in, JSON, .npy and a
PNG strip out, V2, and every bad input a 4xx naming its field."""

from __future__ import annotations

import io
import math
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
from PIL import Image

from service.media import NPY, PNG
from service.scoring import interpolate
from tests.service.conftest import LATENT, eps_for, image_batch, serve

pytestmark = pytest.mark.anyio

URL = "/v1/models/tiny"
A, B = eps_for(1, (2, LATENT))


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def client(model_dir: object) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(model_dir, max_batch=16) as c:  # type: ignore[arg-type]
        yield c


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("method", ["linear", "slerp"])
async def test_endpoints_decode_exactly_the_given_latents(client: httpx.AsyncClient, method: str) -> None:
    body = (
        await client.post(
            f"{URL}/interpolate", json={"z": [A.tolist(), B.tolist()], "steps": 5, "method": method}
        )
    ).json()
    z, images = np.float32(body["z"]), np.float32(body["images"])
    assert z.shape == (5, LATENT) and images.shape == (5, 1, 28, 28)
    assert np.array_equal(z[0], A) and np.array_equal(z[-1], B)
    assert body["t"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    decoded = (await client.post(f"{URL}/decode", json={"z": [A.tolist(), B.tolist()]})).json()["samples"]
    assert np.array_equal(images[[0, -1]], np.float32(decoded))  # the same bits as decode


def test_linear_is_a_straight_line_and_slerp_an_arc() -> None:
    t, line = interpolate(A, B, 5, "linear")
    np.testing.assert_allclose(line[2], (A + B) / 2, rtol=1e-6)
    _, arc = interpolate(A, B, 5, "slerp")
    omega = math.acos(float(A @ B) / float(np.linalg.norm(A) * np.linalg.norm(B)))
    middle = (math.sin(omega / 2) * (A + B)) / math.sin(omega)  # sin((1 - t) w) = sin(t w) at t = 1/2
    np.testing.assert_allclose(arc[2], middle, rtol=1e-5)
    assert t.dtype == np.float32 and line.dtype == np.float32


@pytest.mark.parametrize(
    ("a", "b"),
    [(A, 2 * A), (A, -A), (np.zeros(LATENT, np.float32), B)],
    ids=["parallel", "antipodal", "zero"],
)
def test_slerp_falls_back_to_linear_where_the_arc_is_undefined(a: np.ndarray, b: np.ndarray) -> None:
    _, arc = interpolate(np.float32(a), np.float32(b), 4, "slerp")
    _, line = interpolate(np.float32(a), np.float32(b), 4, "linear")
    assert np.all(np.isfinite(arc))
    np.testing.assert_allclose(arc, line, rtol=1e-5, atol=1e-6)


async def test_between_two_images_the_path_runs_between_their_means(client: httpx.AsyncClient) -> None:
    x = image_batch(2, seed=3)
    body = (await client.post(f"{URL}/interpolate", json={"inputs": x.tolist(), "steps": 3})).json()
    mu = (await client.post(f"{URL}/encode", json={"inputs": x.tolist()})).json()["mu"]
    assert np.array_equal(np.float32(body["z"])[[0, -1]], np.float32(mu))
    from_npy = await client.post(f"{URL}/interpolate?steps=3", content=npy(x), headers={"Content-Type": NPY})
    assert from_npy.json() == body
    latents = await client.post(
        f"{URL}/interpolate?steps=3&latent=true", content=npy(np.float32(mu)), headers={"Content-Type": NPY}
    )
    assert latents.json() == body


async def test_npy_and_uint8_and_a_png_strip(client: httpx.AsyncClient) -> None:
    request = {"z": [A.tolist(), B.tolist()], "steps": 6, "dtype": "uint8"}
    as_json = (await client.post(f"{URL}/interpolate", json=request)).json()
    array = await client.post(f"{URL}/interpolate", json=request, headers={"Accept": NPY})
    assert array.headers["content-type"] == NPY
    loaded = np.load(io.BytesIO(array.content))
    assert loaded.dtype == np.uint8 and loaded.tolist() == as_json["images"]
    strip = await client.post(f"{URL}/interpolate", json=request, headers={"Accept": PNG})
    assert strip.headers["content-type"] == PNG
    assert strip.headers["x-grid-rows"] == "1" and strip.headers["x-grid-cols"] == "6"
    picture = Image.open(io.BytesIO(strip.content))
    assert picture.size == (6 * 28 + 5 * 2, 28)  # one row: 6 cells, 2 gray pixels between them
    assert np.array_equal(np.asarray(picture)[:, :28], np.uint8(as_json["images"][0][0]))


Z2 = [A.tolist(), B.tolist()]
BAD = [
    ("steps past the limit", {"z": Z2, "steps": 17}, "steps", "steps is 17; the limit (MAX_BATCH) is 16"),
    ("one step", {"z": Z2, "steps": 1}, "steps", "greater than or equal to 2"),
    ("unknown method", {"z": Z2, "method": "cubic"}, "method", "'linear' or 'slerp'"),
    ("mismatched latent sizes", {"z": [A.tolist(), B.tolist()[:-1]]}, "z.1", f"expected {LATENT}"),
    ("latent of the wrong size", {"z": [[0.0] * 5, [0.0] * 5]}, "z.0", f"expected {LATENT}"),
    ("three endpoints", {"z": [*Z2, A.tolist()]}, "z", "expected exactly 2 latent vectors"),
    ("one image", {"inputs": [image_batch(1)[0].tolist()]}, "inputs", "expected exactly 2 images"),
    ("both forms", {"z": Z2, "inputs": []}, "z", "not both"),
    ("neither form", {"steps": 4}, "inputs", "field required"),
    ("z not a list", {"z": "AAAA"}, "z", "expected a list of two"),
    ("z out of range", {"z": [[1e4] * LATENT, A.tolist()]}, "z.0.0", "[-1000, 1000]"),
    ("latent flag with JSON", {"inputs": image_batch(2).tolist(), "latent": True}, "latent", ".npy bodies"),
    ("unknown field", {"z": Z2, "n": 3}, "n", "unknown field"),
]


@pytest.mark.parametrize(("request_body", "field", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
async def test_bad_input_is_a_422_naming_its_field(
    client: httpx.AsyncClient, request_body: dict[str, object], field: str, message: str
) -> None:
    response = await client.post(f"{URL}/interpolate", json=request_body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field and message in error["message"], error


async def test_nan_npy_and_media_errors(client: httpx.AsyncClient) -> None:
    nan = ('{"z": [[NaN' + ", 0.0" * (LATENT - 1) + "], " + str(B.tolist()) + "]}").encode()
    response = await client.post(
        f"{URL}/interpolate", content=nan, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422 and response.json()["error"]["field"] == "z.0.0"
    three = await client.post(
        f"{URL}/interpolate?latent=true",
        content=npy(np.zeros((3, LATENT), np.float32)),
        headers={"Content-Type": NPY},
    )
    assert three.status_code == 422 and "exactly 2" in three.json()["error"]["message"]
    wrong = await client.post(
        f"{URL}/interpolate?latent=true",
        content=npy(np.zeros((2, LATENT + 1), np.float32)),
        headers={"Content-Type": NPY},
    )
    assert wrong.status_code == 422 and wrong.json()["error"]["field"] == "z"
    text = await client.post(f"{URL}/interpolate", content=b"z", headers={"Content-Type": "text/plain"})
    assert text.status_code == 415
    assert (
        await client.post(f"{URL}/interpolate", json={"z": Z2}, headers={"Accept": "text/csv"})
    ).status_code == 406


async def test_v2_interpolate_answers_as_v1(client: httpx.AsyncClient) -> None:
    z = np.stack([A, B])
    request = {
        "inputs": [{"name": "z", "datatype": "FP32", "shape": [2, LATENT], "data": z.reshape(-1).tolist()}],
        "parameters": {"steps": 4, "method": "slerp"},
    }
    v2 = await client.post("/v2/models/tiny.interpolate/infer", json=request)
    assert v2.status_code == 200, v2.text
    outputs = {o["name"]: o for o in v2.json()["outputs"]}
    v1 = (await client.post(f"{URL}/interpolate", json={"z": Z2, "steps": 4, "method": "slerp"})).json()
    assert np.array_equal(np.float32(outputs["z"]["data"]), np.float32(v1["z"]).reshape(-1))
    assert np.array_equal(np.float32(outputs["images"]["data"]), np.float32(v1["images"]).reshape(-1))
    one = {**request, "inputs": [{**request["inputs"][0], "shape": [1, LATENT], "data": A.tolist()}]}  # type: ignore[dict-item]
    refused = await client.post("/v2/models/tiny.interpolate/infer", json=one)
    assert refused.status_code == 400 and "exactly 2" in refused.json()["error"]
    long = {**request, "parameters": {"steps": 17}}
    assert "MAX_BATCH" in (await client.post("/v2/models/tiny.interpolate/infer", json=long)).json()["error"]
