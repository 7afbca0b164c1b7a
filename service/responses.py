"""Response bodies straight from numpy: JSON via orjson, `.npy`, and PNG grids.

No per-element Python loops: orjson serialises float32/uint8 arrays natively (`json.dumps` on nested
floats costs a hundred times more).

Binary bodies (`Accept: application/x-npy`) are one `.npy` file: the image array [n, *input_shape] for
sample, reconstruct and decode; for encode a structured array of length batch with fields
mu, logvar, sigma (float32, (latent_dim,)) and, when samples > 0, z (float32, (samples, latent_dim)).
The seed travels in the `X-Seed` header. PNG grids (`Accept: image/png`) lay images out row by row,
`X-Grid-Cols` wide and `X-Grid-Rows` high, separated by GRID_PADDING gray pixels.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import orjson
from PIL import Image
from starlette.responses import Response

from service.errors import NotAcceptable
from service.grid import as_uint8, channels_last, tile
from service.media import JSON, NPY, PNG
from service.operations import F32, Encoding
from service.schemas import ImageDtype

GRID_PADDING = 2
GRID_FILL = 128


def with_dtype(images: F32, dtype: ImageDtype) -> np.ndarray:
    return as_uint8(images) if dtype == "uint8" else images


def json_response(payload: dict[str, Any]) -> Response:
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, media_type=JSON)


def npy_bytes(array: np.ndarray) -> bytes:
    """The same bytes as `np.save(array)`, with one copy of the data instead of np.save's three (tobytes,
    BytesIO.write, getvalue): for 256 images that is 800 KB copied once."""
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    return b"".join((header.getvalue(), array.data))


def _seed_headers(seed: int | None) -> dict[str, str]:
    return {} if seed is None else {"X-Seed": str(seed)}


def npy_response(array: np.ndarray, seed: int | None) -> Response:
    return Response(npy_bytes(array), media_type=NPY, headers=_seed_headers(seed))


def png_grid(images: F32) -> tuple[np.ndarray, int, int]:
    """[n, *image] -> one uint8 picture (H x W or H x W x 3), with its rows and columns of cells."""
    try:
        pixels = channels_last(as_uint8(images))
    except ValueError as exc:
        raise NotAcceptable(f"{exc} as PNG", field="accept") from None
    cols = math.ceil(math.sqrt(len(pixels)))
    return tile(pixels, cols, GRID_PADDING, GRID_FILL), math.ceil(len(pixels) / cols), cols


def png_response(images: F32, seed: int | None) -> Response:
    grid, rows, cols = png_grid(images)
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG", compress_level=1)
    headers = {"X-Grid-Rows": str(rows), "X-Grid-Cols": str(cols), **_seed_headers(seed)}
    return Response(buffer.getvalue(), media_type=PNG, headers=headers)


def image_response(
    media: str, images: F32, dtype: ImageDtype, key: str, extra: dict[str, Any], seed: int | None
) -> Response:
    """Images as JSON (`{key: images, **extra}`), one .npy array, or a PNG grid."""
    if media == PNG:
        return png_response(images, seed)
    out = with_dtype(images, dtype)
    if media == NPY:
        return npy_response(out, seed)
    return json_response({key: out, **extra})


def encoding_record(encoding: Encoding) -> np.ndarray:
    """Encode's results as a structured array: one record per input."""
    batch, latent = encoding.mu.shape
    fields: list[tuple[str, type[np.float32], tuple[int, ...]]] = [
        ("mu", np.float32, (latent,)),
        ("logvar", np.float32, (latent,)),
        ("sigma", np.float32, (latent,)),
    ]
    if encoding.z is not None:
        fields.append(("z", np.float32, encoding.z.shape[1:]))
    record = np.empty(batch, dtype=fields)
    record["mu"], record["logvar"], record["sigma"] = encoding.mu, encoding.logvar, encoding.sigma
    if encoding.z is not None:
        record["z"] = encoding.z
    return record


def encoding_response(media: str, encoding: Encoding, seed: int) -> Response:
    if media == NPY:
        return npy_response(encoding_record(encoding), seed)
    payload: dict[str, Any] = {"mu": encoding.mu, "logvar": encoding.logvar, "sigma": encoding.sigma}
    if encoding.z is not None:
        payload["z"] = encoding.z
    payload["seed"] = seed
    return json_response(payload)
