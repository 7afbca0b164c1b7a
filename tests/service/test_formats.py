"""Response and request formats: npy and PNG round trips, uint8, content negotiation, OpenAPI."""

from __future__ import annotations

import base64
import io
import struct

import httpx
import numpy as np
import pytest
from PIL import Image

from service.errors import NotAcceptable
from service.media import JSON, NPY, PNG, negotiate
from service.requests import read_npy
from service.responses import GRID_FILL, GRID_PADDING, npy_bytes, png_grid
from tests.service.conftest import LATENT, f32, image_batch

pytestmark = pytest.mark.anyio

URL = "/v1/models/tiny"


def load_npy(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == NPY
    array: np.ndarray = np.load(io.BytesIO(response.content), allow_pickle=False)
    return array


def png_b64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


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


def _unpadded_npy(array: np.ndarray) -> bytes:
    """A valid .npy whose data starts at an odd offset (np.save pads the header; clients need not)."""
    header = f"{{'descr': '{array.dtype.str}', 'fortran_order': False, 'shape': {array.shape}, }}".encode()
    header += b" " * (len(header) % 2) + b"\n"  # 10 + len(header) odd
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + array.tobytes()


@pytest.mark.parametrize(
    "array",
    [
        np.random.default_rng(0).random((3, 784), dtype=np.float32),
        np.asfortranarray(np.arange(3 * 784).reshape(3, 784) % 2).astype(">i2", order="F"),
        np.arange(2 * 784, dtype=np.uint8).reshape(2, 1, 28, 28),
        np.asfortranarray(np.random.default_rng(1).random((2, 1, 28, 28))),
        np.zeros((0, 784), dtype=np.float32),
    ],
    ids=["c-float32", "fortran-big-endian-int16", "uint8-4d", "fortran-float64-4d", "empty"],
)
@pytest.mark.parametrize("version", [(1, 0), (2, 0)], ids=["v1", "v2"])
def test_read_npy_reads_what_np_save_writes(array: np.ndarray, version: tuple[int, int]) -> None:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version)
    got = read_npy(buffer.getvalue())
    assert got.dtype == array.dtype and got.shape == array.shape
    assert (got.flags.c_contiguous, got.flags.f_contiguous) == (
        array.flags.c_contiguous,
        array.flags.f_contiguous,
    )
    np.testing.assert_array_equal(got, array)


def test_read_npy_aligns_data_an_unpadded_header_left_unaligned() -> None:
    array = np.random.default_rng(2).random((2, 784), dtype=np.float32)
    body = _unpadded_npy(array)
    assert np.frombuffer(body, np.uint8)[len(body) - array.nbytes :].ctypes.data % 4  # the data is unaligned
    got = read_npy(body)
    assert got.flags.aligned
    np.testing.assert_array_equal(got, array)


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


async def test_npy_request_bodies_equal_json_requests(client: httpx.AsyncClient) -> None:
    images = image_batch(3)
    as_json = (
        await client.post(f"{URL}/encode", json={"inputs": images.tolist(), "samples": 2, "seed": 6})
    ).json()
    for array in (images, images.reshape(3, -1), (images * 255).round().astype(np.uint8)):
        assert array.flags.c_contiguous
        response = await client.post(
            f"{URL}/encode?samples=2&seed=6", content=npy_bytes(array), headers={"Content-Type": NPY}
        )
        assert response.status_code == 200, response.text
        for name in ("mu", "z"):
            np.testing.assert_array_equal(f32(response.json()[name]), f32(as_json[name]))

    binary = (images > 0.5).reshape(3, -1)  # values an int16 array can hold
    binary_json = (await client.post(f"{URL}/encode", json={"inputs": binary.astype(float).tolist()})).json()
    fortran_int16 = np.asfortranarray(binary.astype(">i2"))
    assert fortran_int16.flags.f_contiguous and not fortran_int16.flags.c_contiguous
    response = await client.post(
        f"{URL}/encode", content=npy_bytes(fortran_int16), headers={"Content-Type": NPY}
    )
    assert response.status_code == 200, response.text
    np.testing.assert_array_equal(f32(response.json()["mu"]), f32(binary_json["mu"]))

    z = np.array([[0.5, -1.0, 0.0, 2.0]], dtype=np.float32)
    decoded_npy = await client.post(
        f"{URL}/decode", content=npy_bytes(z), headers={"Content-Type": NPY, "Accept": NPY}
    )
    decoded_json = (await client.post(f"{URL}/decode", json={"z": z.tolist()})).json()
    np.testing.assert_array_equal(load_npy(decoded_npy), f32(decoded_json["samples"]))

    recon = await client.post(
        f"{URL}/reconstruct?mode=sample&seed=3", content=npy_bytes(images), headers={"Content-Type": NPY}
    )
    recon_json = (
        await client.post(f"{URL}/reconstruct", json={"inputs": images.tolist(), "mode": "sample", "seed": 3})
    ).json()
    assert recon.json() == recon_json


async def test_png_inputs_equal_their_pixels(client: httpx.AsyncClient) -> None:
    pixels = (image_batch(2) * 255).round().astype(np.uint8)
    as_numbers = (await client.post(f"{URL}/encode", json={"inputs": (pixels / 255).tolist()})).json()
    pngs = [png_b64(p[0]) for p in pixels]
    as_png = (
        await client.post(f"{URL}/encode", json={"inputs": [pngs[0], "data:image/png;base64," + pngs[1]]})
    ).json()
    np.testing.assert_array_equal(f32(as_png["mu"]), f32(as_numbers["mu"]))
    mixed = (
        await client.post(f"{URL}/encode", json={"inputs": [pngs[0], (pixels[1] / 255).ravel().tolist()]})
    ).json()
    np.testing.assert_array_equal(f32(mixed["mu"]), f32(as_numbers["mu"]))


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


@pytest.mark.parametrize(
    ("accept", "offered", "chosen"),
    [
        (None, (JSON, NPY, PNG), JSON),
        ("", (JSON, NPY), JSON),
        ("*/*", (JSON, NPY, PNG), JSON),
        ("image/png", (JSON, NPY, PNG), PNG),
        ("application/*", (JSON, NPY, PNG), JSON),
        ("application/x-npy, application/json;q=0.5", (JSON, NPY), NPY),
        ("application/json;q=0.2, image/png", (JSON, NPY, PNG), PNG),
        ("text/html, */*;q=0.1", (JSON, NPY), JSON),
        ("image/*;q=0.9, application/json;q=0.8", (JSON, NPY, PNG), PNG),
        ("IMAGE/PNG", (JSON, PNG), PNG),
        ("image/png, */*", (JSON, NPY, PNG), PNG),
        ("image/png;q=0, */*", (JSON, PNG), JSON),
        ("application/json;q=0, */*;q=0.5", (JSON, NPY), NPY),
    ],
    ids=[
        "absent",
        "empty",
        "any",
        "png",
        "application-wildcard",
        "q-prefers-npy",
        "q-prefers-png",
        "fallback-any",
        "image-wildcard",
        "case-insensitive",
        "exact-beats-wildcard",
        "explicit-exclusion",
        "excluded-json",
    ],
)
def test_negotiate(accept: str | None, offered: tuple[str, ...], chosen: str) -> None:
    assert negotiate(accept, offered) == chosen


@pytest.mark.parametrize("accept", ["text/html", "image/png;q=0", "application/xml, text/*", "*/*;q=0"])
def test_negotiate_refuses(accept: str) -> None:
    with pytest.raises(NotAcceptable):
        negotiate(accept, (JSON, NPY))


def test_png_grid_layout_for_rgb() -> None:
    images = np.zeros((3, 3, 4, 5), dtype=np.float32)
    images[:, 0] = 1.0  # red
    grid, rows, cols = png_grid(images)
    assert (rows, cols) == (2, 2)
    assert grid.shape == (2 * 4 + GRID_PADDING, 2 * 5 + GRID_PADDING, 3)
    np.testing.assert_array_equal(grid[0, 0], [255, 0, 0])


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
