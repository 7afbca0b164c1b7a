"""Request bodies: .npy and PNG inputs equal JSON ones, and every client mistake gets a 4xx in the
one error shape, naming the field, while the service stays healthy."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import struct
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from service.arrays import read_npy
from service.errors import ServiceError
from service.media import NPY
from service.responses import npy_bytes
from tests.service.conftest import LATENT, PIXELS, f32, image_batch, serve

pytestmark = pytest.mark.anyio


URL = "/v1/models/tiny"


MAX_BATCH = 4


MAX_SAMPLES = 64


GOOD_IMAGE = image_batch(1).reshape(-1).tolist()  # flat, 784 values in [0, 1]


def _with(index: int, value: Any) -> list[Any]:
    image = list(GOOD_IMAGE)
    image[index] = value
    return image


def _raw_image(index: int, token: bytes) -> bytes:
    """A JSON body whose one image has `token` (e.g. NaN, which JSON itself does not allow) at `index`."""
    values = [b"0.5"] * PIXELS
    values[index] = token
    return b'{"inputs": [[' + b",".join(values) + b"]]}"


def _png(size: tuple[int, int], mode: str) -> str:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _png_with_text(chunks: int, text: str = "x") -> str:
    """A valid 28x28 grayscale PNG carrying `chunks` tEXt chunks of metadata."""
    info = PngInfo()
    for i in range(chunks):
        info.add_text(f"k{i}", text)
    buffer = io.BytesIO()
    Image.new("L", (28, 28)).save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


def _png_with_bad_pixels() -> str:
    """A PNG whose header is right and whose image data is garbage (Pillow fails inside decoding)."""
    data = bytearray(base64.b64decode(_png((28, 28), "L")))
    idat = data.index(b"IDAT") + 4
    data[idat : idat + 8] = b"\xff" * 8
    return base64.b64encode(bytes(data)).decode()


def _png_with_bad_header_crc() -> str:
    """A PNG whose IHDR checksum is wrong: Pillow cannot identify it (its message names a Python object)."""
    data = bytearray(base64.b64decode(_png((28, 28), "L")))
    data[29] ^= 0xFF  # the first byte of IHDR's CRC: signature 8 + length 4 + type 4 + data 13
    return base64.b64encode(bytes(data)).decode()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """A minimal version 1.0 .npy header (no alignment padding), to declare what np.save never would."""
    header = f"{{'descr':'{descr}','fortran_order':False,'shape':{shape}}}\n".encode()
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def _npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=image_batch(1))
    return buffer.getvalue()


HUGE_NPY = _npy_header("<f4", (10**12, 784)).ljust(80, b"\0")  # 80 bytes declaring 3 PB of float32


@dataclass(frozen=True)
class Case:
    path: str
    status: int
    field: str | None
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] | None = None
    method: str = "POST"
    says: str = ""  # a fragment the message must contain


NPY_BODY = {"Content-Type": NPY}


CASES = {
    # the body as a whole
    "malformed-json": Case("tiny/encode", 400, "body", content=b'{"inputs": [', says="malformed JSON"),
    "not-utf8": Case("tiny/encode", 400, "body", content=b'{"inputs": "\xff"}', says="malformed JSON"),
    "body-not-object": Case("tiny/encode", 422, "body", json=[1, 2], says="JSON object"),
    "unknown-field": Case(
        "tiny/encode", 422, "sampels", json={"inputs": [GOOD_IMAGE], "sampels": 3}, says="unknown"
    ),
    "unsupported-content-type": Case(
        "tiny/encode", 415, "body", content=b"a=1", headers={"Content-Type": "text/plain"}
    ),
    "query-value-invalid-with-a-body": Case("tiny/sample?n=-1", 422, "n", json={"seed": 1}),
    "float-not-integral": Case("tiny/sample", 422, "n", json={"n": 2.5}),
    # images
    "inputs-missing": Case("tiny/encode", 422, "inputs", json={"samples": 1}, says="required"),
    "inputs-empty": Case("tiny/encode", 422, "inputs", json={"inputs": []}, says="non-empty"),
    "inputs-not-a-list": Case("tiny/encode", 422, "inputs", json={"inputs": 5}),
    "single-image-unwrapped": Case("tiny/encode", 422, "inputs", json={"inputs": GOOD_IMAGE}, says="[[...]]"),
    "image-wrong-size": Case("tiny/encode", 422, "inputs.0", json={"inputs": [GOOD_IMAGE[:-1]]}, says="784"),
    "image-wrong-rank": Case(
        "tiny/encode", 422, "inputs.0", json={"inputs": [[[0.5] * 28] * 28]}, says="[1, 28, 28]"
    ),
    "image-wrong-inner-size": Case(
        "tiny/encode",
        422,
        "inputs.0.0.3",
        json={"inputs": [[[[0.5] * 28] * 3 + [[0.5] * 27] + [[0.5] * 28] * 24]]},
    ),
    "second-image-short": Case(
        "tiny/encode", 422, "inputs.1", json={"inputs": [GOOD_IMAGE, GOOD_IMAGE[:10]]}
    ),
    "image-is-number": Case("tiny/encode", 422, "inputs.1", json={"inputs": [GOOD_IMAGE, 3]}),
    "non-number-string": Case(
        "tiny/encode", 422, "inputs.0.12", json={"inputs": [_with(12, "x")]}, says="a string"
    ),
    "non-number-null": Case("tiny/encode", 422, "inputs.0.3", json={"inputs": [_with(3, None)]}, says="null"),
    "non-number-bool": Case(
        "tiny/encode", 422, "inputs.0.0", json={"inputs": [[True] * PIXELS]}, says="boolean"
    ),
    "nan": Case("tiny/encode", 422, "inputs.0.7", content=_raw_image(7, b"NaN"), says="finite"),
    "infinity": Case(
        "tiny/reconstruct", 422, "inputs.0.0", content=_raw_image(0, b"-Infinity"), says="finite"
    ),
    "beyond-float64": Case("tiny/encode", 422, "inputs.0.1", content=_raw_image(1, b"1e999"), says="finite"),
    "beyond-float32": Case("tiny/encode", 422, "inputs.0.2", content=_raw_image(2, b"1e39"), says="finite"),
    "above-one": Case("tiny/encode", 422, "inputs.0.12", json={"inputs": [_with(12, 1.5)]}, says="[0, 1]"),
    "below-zero": Case(
        "tiny/reconstruct", 422, "inputs.0.0", json={"inputs": [_with(0, -0.1)]}, says="[0, 1]"
    ),
    "above-one-nested": Case(
        "tiny/encode",
        422,
        "inputs.0.0.1.2",
        json={"inputs": [np.where(np.arange(PIXELS).reshape(1, 28, 28) == 30, 2.0, 0.5).tolist()]},
    ),
    "batch-over-limit": Case(
        "tiny/encode", 422, "inputs", json={"inputs": [GOOD_IMAGE] * (MAX_BATCH + 1)}, says="MAX_BATCH"
    ),
    "png-not-base64": Case("tiny/encode", 422, "inputs.0", json={"inputs": ["not base64!"]}, says="base64"),
    "png-not-png": Case(
        "tiny/encode",
        422,
        "inputs.0",
        json={"inputs": [base64.b64encode(b"GIF89a" * 10).decode()]},
        says="not a PNG",
    ),
    "png-wrong-size": Case(
        "tiny/encode", 422, "inputs.0", json={"inputs": [_png((10, 10), "L")]}, says="28x28"
    ),
    "png-rgb": Case(
        "tiny/encode", 422, "inputs.0", json={"inputs": [_png((28, 28), "RGB")]}, says="grayscale"
    ),
    "png-over-max-png-bytes": Case(
        "tiny/encode",
        422,
        "inputs.0",
        json={"inputs": [_png_with_text(1, "x" * 70_000)]},
        says="MAX_PNG_BYTES",
    ),
    "png-metadata-padding": Case(
        "tiny/encode", 422, "inputs.0", json={"inputs": [_png_with_text(200)]}, says="at most 64 chunks"
    ),
    "png-corrupt-pixels": Case(
        "tiny/encode", 422, "inputs.0", json={"inputs": [_png_with_bad_pixels()]}, says="unreadable PNG"
    ),
    "png-bad-header-crc": Case(
        "tiny/encode", 422, "inputs.0", json={"inputs": [_png_with_bad_header_crc()]}, says="unreadable PNG"
    ),
    # small fields
    "samples-negative": Case("tiny/encode", 422, "samples", json={"inputs": [GOOD_IMAGE], "samples": -1}),
    "samples-string": Case("tiny/encode", 422, "samples", json={"inputs": [GOOD_IMAGE], "samples": "3"}),
    "samples-over-limit": Case(
        "tiny/encode",
        422,
        "samples",
        json={"inputs": [GOOD_IMAGE], "samples": MAX_SAMPLES + 1},
        says="MAX_SAMPLES",
    ),
    "inputs-x-samples-over-limit": Case(
        "tiny/encode", 422, "samples", json={"inputs": [GOOD_IMAGE] * 2, "samples": 40}, says="MAX_SAMPLES"
    ),
    "seed-negative": Case("tiny/sample", 422, "seed", json={"seed": -1}),
    "seed-too-large": Case("tiny/sample", 422, "seed", json={"seed": 2**64}),
    "seed-float": Case("tiny/sample", 422, "seed", json={"seed": 1.5}),
    "n-zero": Case("tiny/sample", 422, "n", json={"n": 0}),
    "n-over-limit": Case("tiny/sample", 422, "n", json={"n": MAX_SAMPLES + 1}, says="MAX_SAMPLES"),
    "n-nan": Case("tiny/sample", 422, "n", content=b'{"n": NaN}'),
    "temperature-negative": Case("tiny/sample", 422, "temperature", json={"temperature": -0.5}),
    "temperature-infinite": Case("tiny/sample", 422, "temperature", content=b'{"temperature": Infinity}'),
    "temperature-text": Case("tiny/sample", 422, "temperature", json={"temperature": "hot"}),
    "dtype-unknown": Case("tiny/sample", 422, "dtype", json={"dtype": "float64"}),
    "mode-unknown": Case("tiny/reconstruct", 422, "mode", json={"inputs": [GOOD_IMAGE], "mode": "median"}),
    "query-n-not-int": Case("tiny/sample?n=many", 422, "n"),
    # latents
    "z-missing": Case("tiny/decode", 422, "z", json={}),
    "z-empty": Case("tiny/decode", 422, "z", json={"z": []}),
    "z-wrong-dim": Case(
        "tiny/decode", 422, "z.1", json={"z": [[0.0] * LATENT, [0.0] * (LATENT + 1)]}, says=str(LATENT)
    ),
    "z-flat": Case("tiny/decode", 422, "z.0", json={"z": [0.0] * LATENT}),
    "z-nan": Case("tiny/decode", 422, "z.0.1", content=b'{"z": [[0, NaN, 0, 0]]}', says="finite"),
    "z-out-of-range": Case("tiny/decode", 422, "z.0.3", json={"z": [[0, 0, 0, 1e6]]}, says="[-1000, 1000]"),
    "integer-beyond-float32": Case(
        "tiny/encode", 422, "inputs.0.4", json={"inputs": [_with(4, 10**400)]}, says="beyond"
    ),
    "z-over-limit": Case(
        "tiny/decode", 422, "z", json={"z": [[0.0] * LATENT] * (MAX_BATCH + 1)}, says="MAX_BATCH"
    ),
    # npy bodies
    "npy-garbage": Case(
        "tiny/encode", 400, "body", content=b"\x93NUMPY garbage", headers=NPY_BODY, says=".npy"
    ),
    "npy-wrong-shape": Case(
        "tiny/encode", 422, "inputs", content=_npy(np.zeros((2, 783), np.float32)), headers=NPY_BODY
    ),
    "npy-object-dtype": Case(
        "tiny/encode",
        422,
        "body",
        content=_npy(np.array([{"a": 1}], dtype=object)),
        headers=NPY_BODY,
        says="numeric",
    ),
    "npy-huge-declared-shape": Case(
        "tiny/encode",
        400,
        "body",
        content=HUGE_NPY,
        headers=NPY_BODY,
        says="declares float32[1000000000000, 784]",
    ),
    "npy-truncated": Case(
        "tiny/encode", 400, "body", content=_npy(image_batch(2))[:-4], headers=NPY_BODY, says="holds 6268"
    ),
    "npy-trailing-bytes": Case(
        "tiny/encode",
        400,
        "body",
        content=_npy(image_batch(1)) + b"\0" * 4,
        headers=NPY_BODY,
        says="holds 3140",
    ),
    "npy-negative-dims": Case(
        "tiny/encode",
        400,
        "body",
        content=_npy_header("<f4", (-1, -PIXELS)) + bytes(4 * PIXELS),
        headers=NPY_BODY,
        says="negative",
    ),
    "npy-version-3": Case(
        "tiny/encode",
        400,
        "body",
        content=b"\x93NUMPY\x03\x00" + _npy(image_batch(1))[8:],
        headers=NPY_BODY,
        says="version 3.0",
    ),
    "npy-too-many-dims": Case(
        "tiny/encode",
        400,
        "body",
        content=_npy_header("<f4", (1,) * 65) + bytes(4),
        headers=NPY_BODY,
        says="65",
    ),
    "npy-header-not-python": Case(
        "tiny/encode", 400, "body", content=b"\x93NUMPY\x01\x00\x05\x00{{{{\n", headers=NPY_BODY, says=".npy"
    ),
    "npz": Case("tiny/encode", 400, "body", content=_npz(), headers=NPY_BODY, says=".npz"),
    "npy-text-dtype": Case(
        "tiny/encode", 422, "body", content=_npy(np.array(["a"])), headers=NPY_BODY, says="numeric"
    ),
    "npy-nan": Case(
        "tiny/encode",
        422,
        "inputs.1.5",
        content=_npy(np.where(np.arange(2 * PIXELS).reshape(2, PIXELS) == PIXELS + 5, np.nan, 0.5)),
        headers=NPY_BODY,
    ),
    "npy-z-wrong-dim": Case(
        "tiny/decode", 422, "z", content=_npy(np.zeros((3, LATENT + 1))), headers=NPY_BODY
    ),
    "npy-bad-query": Case(
        "tiny/encode?samples=lots", 422, "samples", content=_npy(image_batch(1)), headers=NPY_BODY
    ),
    "npy-on-sample": Case("tiny/sample", 415, "body", content=_npy(np.zeros(3)), headers=NPY_BODY),
    # routing and negotiation
    "unknown-model": Case("nope/sample", 404, "model", json={}),
    "unknown-version": Case("tiny/versions/3/sample", 404, "version", json={}, says="'10'"),
    "unknown-model-metadata": Case("nope", 404, "model", method="GET"),
    "accept-unsupported": Case("tiny/sample", 406, "accept", json={}, headers={"Accept": "text/html"}),
    "accept-png-on-encode": Case(
        "tiny/encode", 406, "accept", json={"inputs": [GOOD_IMAGE]}, headers={"Accept": "image/png"}
    ),
    "wrong-method": Case("tiny/sample", 405, None, method="GET"),
}


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """Module scope, for the module-scoped client below."""
    return "asyncio"


@pytest.fixture(scope="module")
async def limited(model_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(model_dir, max_batch=MAX_BATCH, max_samples=MAX_SAMPLES, max_queue_rows=256) as client:
        yield client


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_bad_request_gets_a_4xx_naming_the_field(limited: httpx.AsyncClient, case: Case) -> None:
    kwargs: dict[str, Any] = {"headers": case.headers or {}}
    if case.json is not None:
        kwargs["json"] = case.json
    if case.content is not None:
        kwargs["content"] = case.content
    response = await limited.request(case.method, f"/v1/models/{case.path}", **kwargs)
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["status"] == case.status
    assert error["field"] == case.field, error
    assert case.says in error["message"]
    assert not re.search(r"0x[0-9a-f]{6,}|object at", error["message"]), "internals in a message"

    after = await limited.post(f"{URL}/sample", json={"n": 1, "seed": 0})
    assert after.status_code == 200, "a good request after a bad one must still work"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_over_max_body_bytes_is_413(model_dir: Path, chunked: bool) -> None:
    body = orjson.dumps({"inputs": [GOOD_IMAGE] * 2})  # ~25 kB
    assert len(body) > 4096

    async def stream() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    async with serve(model_dir, max_body_bytes=4096) as client:
        content: Any = stream() if chunked else body
        response = await client.post(
            f"{URL}/encode", content=content, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 413, response.text
        assert response.json()["error"]["field"] == "body"
        assert "MAX_BODY_BYTES is 4096" in response.json()["error"]["message"]
        small = await client.post(f"{URL}/encode", json={"inputs": [GOOD_IMAGE[:10]]})
        assert small.status_code == 422  # under the limit, so it reaches validation


async def test_queue_full_answers_503_with_retry_after(model_dir: Path) -> None:
    """A request bigger than the free queue is refused at once, not queued."""
    async with serve(
        model_dir, max_samples=64, max_batch=4, max_queue_rows=64, batch_window_ms=500
    ) as client:
        first = client.post(f"{URL}/sample", json={"n": 40, "seed": 1})
        second = client.post(f"{URL}/sample", json={"n": 40, "seed": 2})
        responses = await asyncio.gather(first, second)
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200, 503], [r.text for r in responses]
        refused = next(r for r in responses if r.status_code == 503)
        assert int(refused.headers["retry-after"]) >= 1
        assert "queue is full" in refused.json()["error"]["message"]
        assert (await client.post(f"{URL}/sample", json={"n": 40, "seed": 3})).status_code == 200


def test_no_mangled_npy_header_escapes_as_anything_but_a_4xx() -> None:
    """numpy's header parser raises half a dozen exception types on mangled headers; each must be a 4xx."""
    rng = np.random.default_rng(0)
    good = _npy(image_batch(1))
    for _ in range(3000):
        body = bytearray(good[: rng.integers(8, 140)] if rng.random() < 0.5 else good)
        for index in rng.integers(0, len(body), size=rng.integers(1, 4)):
            body[index] = rng.integers(0, 256)
        with warnings.catch_warnings():  # numpy warns about headers it has to re-parse "as Python 2"
            warnings.simplefilter("ignore")
            try:
                read_npy(bytes(body))
            except ServiceError as exc:
                assert exc.status in (400, 422), exc


def load_npy(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == NPY
    array: np.ndarray = np.load(io.BytesIO(response.content), allow_pickle=False)
    return array


def png_b64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


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
