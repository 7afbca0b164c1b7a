"""Responses: .npy bytes, uint8 pixels and PNG grids carry exactly what JSON carries."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from service.media import NPY, PNG
from service.responses import GRID_FILL, GRID_PADDING, npy_bytes
from tests.service.conftest import LATENT, f32, image_batch

pytestmark = pytest.mark.anyio


URL = "/v1/models/tiny"


def load_npy(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == NPY
    array: np.ndarray = np.load(io.BytesIO(response.content), allow_pickle=False)
    return array


def _np_save(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "array",
    [
        np.random.default_rng(0).random((256, 1, 28, 28), dtype=np.float32),
        np.arange(3 * 784, dtype=np.uint8).reshape(3, 784),
        np.zeros((2, 5), dtype=np.float32)[:, ::2],  # not contiguous
        np.zeros(4, dtype=[("mu", np.float32, (3,)), ("z", np.float32, (2, 3))]),
        np.zeros((0, 4), dtype=np.float32),
    ],
    ids=["images", "uint8", "strided", "structured", "empty"],
)
def test_npy_bytes_are_exactly_what_np_save_writes(array: np.ndarray) -> None:
    assert npy_bytes(array) == _np_save(array)


@pytest.mark.parametrize("op", ["sample", "decode", "reconstruct"])
async def test_npy_images_equal_json_images_exactly(client: httpx.AsyncClient, op: str) -> None:
    payloads: dict[str, dict[str, object]] = {
        "sample": {"n": 3, "seed": 4},
        "decode": {"z": [[0.1, -0.2, 0.3, 0.0], [1.0, 1.0, -1.0, 0.5]]},
        "reconstruct": {"inputs": image_batch(2).tolist(), "mode": "sample", "seed": 4},
    }
    payload = payloads[op]
    as_json = (await client.post(f"{URL}/{op}", json=payload)).json()
    response = await client.post(f"{URL}/{op}", json=payload, headers={"Accept": NPY})
    images = load_npy(response)
    assert images.dtype == np.float32 and images.shape[1:] == (1, 28, 28)
    key = "reconstructions" if op == "reconstruct" else "samples"
    np.testing.assert_array_equal(images, f32(as_json[key]))
    assert response.headers.get("x-seed") == (None if op == "decode" else "4")


async def test_encode_npy_is_a_structured_array_equal_to_json(client: httpx.AsyncClient) -> None:
    payload = {"inputs": image_batch(3).tolist(), "samples": 5, "seed": 9}
    as_json = (await client.post(f"{URL}/encode", json=payload)).json()
    response = await client.post(f"{URL}/encode", json=payload, headers={"Accept": NPY})
    record = load_npy(response)
    assert record.shape == (3,)
    assert record.dtype.names == ("mu", "logvar", "sigma", "z")
    assert record.dtype["z"].shape == (5, LATENT)
    for name in ("mu", "logvar", "sigma", "z"):
        np.testing.assert_array_equal(record[name], f32(as_json[name]))
    assert response.headers["x-seed"] == "9"

    without_z = load_npy(
        await client.post(f"{URL}/encode", json={"inputs": payload["inputs"]}, headers={"Accept": NPY})
    )
    assert without_z.dtype.names == ("mu", "logvar", "sigma")


async def test_uint8_dtype_is_rounded_pixels(client: httpx.AsyncClient) -> None:
    floats = f32((await client.post(f"{URL}/sample", json={"n": 2, "seed": 1})).json()["samples"])
    as_uint8 = (await client.post(f"{URL}/sample", json={"n": 2, "seed": 1, "dtype": "uint8"})).json()[
        "samples"
    ]
    expected = np.rint(floats * np.float32(255)).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(as_uint8), expected)
    assert all(isinstance(v, int) for v in np.asarray(as_uint8, dtype=object).ravel()[:10])
    npy = load_npy(
        await client.post(
            f"{URL}/sample", json={"n": 2, "seed": 1, "dtype": "uint8"}, headers={"Accept": NPY}
        )
    )
    assert npy.dtype == np.uint8
    np.testing.assert_array_equal(npy, expected)


@pytest.mark.parametrize("n", [1, 5])
async def test_png_grid_holds_the_uint8_images(client: httpx.AsyncClient, n: int) -> None:
    response = await client.post(f"{URL}/sample", json={"n": n, "seed": 2}, headers={"Accept": PNG})
    assert response.status_code == 200
    assert response.headers["content-type"] == PNG
    rows, cols = int(response.headers["x-grid-rows"]), int(response.headers["x-grid-cols"])
    assert (rows, cols) == ((1, 1) if n == 1 else (2, 3))
    grid = np.asarray(Image.open(io.BytesIO(response.content)))
    step = 28 + GRID_PADDING
    assert grid.shape == (rows * step - GRID_PADDING, cols * step - GRID_PADDING)
    expected = (await client.post(f"{URL}/sample", json={"n": n, "seed": 2, "dtype": "uint8"})).json()[
        "samples"
    ]
    for k in range(n):
        r, c = divmod(k, cols)
        np.testing.assert_array_equal(
            grid[r * step : r * step + 28, c * step : c * step + 28], np.asarray(expected[k][0])
        )
    if n == 5:  # the sixth cell is empty
        assert np.all(grid[step:, 2 * step :] == GRID_FILL)


async def test_png_on_reconstruct_and_decode(client: httpx.AsyncClient) -> None:
    recon = await client.post(
        f"{URL}/reconstruct", json={"inputs": image_batch(1).tolist()}, headers={"Accept": PNG}
    )
    decode = await client.post(
        f"{URL}/decode", json={"z": [[0.0] * LATENT] * 2}, headers={"Accept": "image/*"}
    )
    for response in (recon, decode):
        assert response.status_code == 200 and response.headers["content-type"] == PNG
        Image.open(io.BytesIO(response.content)).verify()
