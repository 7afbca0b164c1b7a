"""Checking the arrays of a request, element by element, into float32 batches with errors naming the element.

Images arrive as, per item of `inputs`:
  - a list of numbers, either flat (`prod(input_shape)` values) or nested in exactly the model's
    `input_shape` (e.g. [1, 28, 28]), values in the manifest's value_range ([0, 1]);
  - a base64 string of an 8-bit grayscale PNG of the model's height and width (pixels / 255), optionally
    as a `data:image/png;base64,` URL;
or the whole body is an `application/x-npy` array [batch, D] or [batch, *input_shape]: uint8 arrays are
pixels (/ 255), other integer and float dtypes are values in [0, 1]. Latents are [batch, latent_dim].

Arrays are parsed by orjson and checked with numpy, not validated by pydantic (for 256 x 784 nested numbers
that would cost far more than the model run), with errors that name the exact element (`inputs.3.12`).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import struct
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from service.errors import BadRequest, InvalidInput, check_limit
from service.operations import F32

Numeric = npt.NDArray[np.number[Any]]
"""An array of any integer or float dtype, as clients send it (an .npy body, a parsed JSON list)."""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FLOAT32_MAX = float(np.finfo(np.float32).max)
LATENT_RANGE = (-1000.0, 1000.0)
"""z beyond a thousand prior standard deviations is numerically meaningless (and can overflow to NaN)."""


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return "an object"


def _is_number(value: object) -> bool:
    """A JSON number that fits float32's range (bool is an int subclass but not a number here)."""
    if type(value) is float:
        return True
    return type(value) is int and abs(value) <= FLOAT32_MAX


def _walk(node: object, dims: tuple[int, ...], path: str, shape_text: str) -> None:
    """Find the first element of `node` that breaks shape `dims` or is not a number (the slow, error path)."""
    if not isinstance(node, list):
        raise InvalidInput(f"expected a list of {dims[0]} ({shape_text}), got {json_type(node)}", field=path)
    if len(node) != dims[0]:
        raise InvalidInput(f"expected {dims[0]} entries here ({shape_text}), got {len(node)}", field=path)
    if len(dims) == 1:
        for j, value in enumerate(node):
            if not _is_number(value):
                got = "an integer beyond float32's range" if type(value) is int else json_type(value)
                raise InvalidInput(f"expected a number, got {got}", field=f"{path}.{j}")
    else:
        for j, child in enumerate(node):
            _walk(child, dims[1:], f"{path}.{j}", shape_text)


def _to_float32(array: Numeric) -> F32:
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, caught by the finite check
        return np.ascontiguousarray(array, dtype=np.float32)


def _fast_numeric(value: list[Any]) -> Numeric | None:
    """One numpy conversion of a uniform nested list of numbers, or None when it is ragged or not numeric."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        return None
    return array if array.dtype.kind in "iuf" else None


def _png_pixels(text: str, path: str, input_shape: tuple[int, ...], max_bytes: int) -> F32:
    """An 8-bit grayscale PNG of the model's height x width, as values in [0, 1].

    Its size, dimensions and chunk count are checked before Pillow decodes anything, so that a small image
    wrapped in megabytes of metadata costs no more than its bytes' length to refuse.
    """
    height, width = _png_size(input_shape, path)
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if header != "data:image/png;base64":
            raise InvalidInput(f"expected a data:image/png;base64 URL, got {header!r}", field=path)
    if len(text) * 3 // 4 > max_bytes:
        raise InvalidInput(f"a PNG item may hold at most {max_bytes} bytes (MAX_PNG_BYTES)", field=path)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("expected a base64-encoded PNG (or a list of numbers)", field=path) from None
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise InvalidInput("base64 data is not a PNG", field=path)
    png_width, png_height = struct.unpack(">II", data[16:24])
    if (png_width, png_height) != (width, height):
        raise InvalidInput(f"expected a {width}x{height} PNG, got {png_width}x{png_height}", field=path)
    _check_chunks(data, path)
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            if image.mode != "L":
                raise InvalidInput(
                    f"expected an 8-bit grayscale PNG (mode L), got mode {image.mode}", field=path
                )
            pixels = np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, struct.error):
        raise InvalidInput("unreadable PNG: its image data is corrupt or truncated", field=path) from None
    return (pixels.astype(np.float32) / np.float32(255)).reshape(input_shape)


def _png_size(input_shape: tuple[int, ...], path: str) -> tuple[int, int]:
    """(height, width) of a grayscale image of `input_shape`, or InvalidInput if it has channels."""
    if len(input_shape) == 3 and input_shape[0] == 1:
        return input_shape[1], input_shape[2]
    if len(input_shape) == 2:
        return input_shape[0], input_shape[1]
    raise InvalidInput(
        f"this model's input shape {list(input_shape)} cannot come as a grayscale PNG; send numbers",
        field=path,
    )


MAX_PNG_CHUNKS = 64
"""A grayscale image needs IHDR, a few IDATs and IEND; more chunks than this is metadata padding."""


def _check_chunks(data: bytes, path: str) -> None:
    """Walk the chunk headers (length, type) without reading their data: refuse too many, or a broken walk."""
    offset, count = len(PNG_SIGNATURE), 0
    while offset + 8 <= len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        count += 1
        if count > MAX_PNG_CHUNKS:
            raise InvalidInput(f"a PNG item may hold at most {MAX_PNG_CHUNKS} chunks", field=path)
        if data[offset + 4 : offset + 8] == b"IEND":
            return
        offset += 12 + length  # length, type, data, CRC
    raise InvalidInput("unreadable PNG: it ends before its IEND chunk", field=path)


def _one_image(item: object, path: str, input_shape: tuple[int, ...], max_png_bytes: int) -> tuple[F32, bool]:
    """One request item -> (image in input_shape, whether the client sent it flat)."""
    size = math.prod(input_shape)
    if isinstance(item, str):
        return _png_pixels(item, path, input_shape, max_png_bytes), True
    shape_text = f"an image is {size} numbers flat or nested as {list(input_shape)}"
    if not isinstance(item, list):
        raise InvalidInput(
            f"expected an image ({shape_text}, or a base64 PNG), got {json_type(item)}", field=path
        )
    flat = not item or not isinstance(item[0], list)
    _walk(item, (size,) if flat else input_shape, path, shape_text)
    return _to_float32(np.asarray(item)).reshape(input_shape), flat


def _check_values(
    array: F32,
    field: str,
    flat: list[bool],
    item_shape: tuple[int, ...],
    value_range: tuple[float, float],
) -> None:
    """Every value finite and inside value_range; errors name the element as the client indexed it."""
    rows = array.reshape(array.shape[0], -1)
    bad = ~np.isfinite(rows)
    expected = "a finite number (float32)"
    if not bad.any():
        low, high = value_range
        bad = (rows < low) | (rows > high)
        expected = f"a number in [{low:g}, {high:g}]"
    if not bad.any():
        return
    i, j = (int(k) for k in np.argwhere(bad)[0])
    index = [j] if flat[i] else [int(k) for k in np.unravel_index(j, item_shape)]
    raise InvalidInput(
        f"expected {expected}, got {rows[i, j]:g}", field=".".join([field, str(i), *map(str, index)])
    )


def parse_images(
    value: object,
    input_shape: tuple[int, ...],
    value_range: tuple[float, float],
    max_batch: int,
    max_png_bytes: int,
    field: str = "inputs",
) -> F32:
    """JSON `inputs` -> float32 [batch, *input_shape], or InvalidInput naming the offending element."""
    if not isinstance(value, list) or not value:
        raise InvalidInput(f"expected a non-empty list of images, got {json_type(value)}", field=field)
    size = math.prod(input_shape)
    array = _fast_numeric(value)
    if array is not None and array.ndim == 1:
        raise InvalidInput(
            "expected a list of images, got one list of numbers; wrap one image as [[...]]", field=field
        )
    check_limit(len(value), max_batch, field, "MAX_BATCH", "the number of images")
    if array is not None and array.shape[1:] in ((size,), input_shape):
        images = _to_float32(array).reshape(len(value), *input_shape)
        flat = [array.ndim == 2] * len(value)
    else:
        parsed = [
            _one_image(item, f"{field}.{i}", input_shape, max_png_bytes) for i, item in enumerate(value)
        ]
        images = np.stack([image for image, _ in parsed])
        flat = [is_flat for _, is_flat in parsed]
    _check_values(images, field, flat, input_shape, value_range)
    return images


def parse_latents(value: object, latent_dim: int, max_batch: int, field: str = "z") -> F32:
    """JSON `z` -> float32 [batch, latent_dim] of finite numbers within LATENT_RANGE."""
    if not isinstance(value, list) or not value:
        raise InvalidInput(
            f"expected a non-empty list of latent vectors, got {json_type(value)}", field=field
        )
    check_limit(len(value), max_batch, field, "MAX_BATCH", "the number of latent vectors")
    array = _fast_numeric(value)
    if array is None or array.shape[1:] != (latent_dim,):
        for i, item in enumerate(value):
            _walk(item, (latent_dim,), f"{field}.{i}", f"latent_dim is {latent_dim}")
        array = np.asarray(value)
    latents = _to_float32(array)
    _check_values(latents, field, [True] * len(value), (latent_dim,), LATENT_RANGE)
    return latents


NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
"""np.save writes 1.0 (2.0 for headers over 64 KiB); 3.0 only adds UTF-8 field names, which numeric dtypes
lack."""
NPY_MAX_DIMS = 32
"""numpy 1.x's limit on dimensions (2.x allows 64); a batch of images needs a handful."""


def read_npy(body: bytes) -> Numeric:
    """An `application/x-npy` body as a numeric array: a read-only view of the body (aligned), no pickles.

    np.load allocates the shape its header declares before it reads any data, so a few bytes declaring
    (10**12, 784) would be a MemoryError (a 500). Here the header must account for the body's length
    exactly before anything is allocated.
    """
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = NPY_HEADER_READERS.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}; send 1.0 or 2.0")
        shape, fortran_order, dtype = read_header(stream)
    except Exception as exc:  # numpy's header parser raises ValueError, SyntaxError, TypeError, TokenError...
        if body.startswith(b"PK\x03\x04"):
            raise BadRequest("body is an .npz archive; send a single .npy array", field="body") from None
        raise BadRequest(f"body is not a readable .npy file: {exc}", field="body") from None
    if dtype.kind not in "iuf":
        raise InvalidInput(f"expected a numeric array, got dtype {dtype}", field="body")
    if any(dim < 0 for dim in shape):
        raise BadRequest(f"the .npy header declares a negative dimension: {list(shape)}", field="body")
    if len(shape) > NPY_MAX_DIMS:
        raise BadRequest(
            f"the .npy header declares {len(shape)} dimensions; at most {NPY_MAX_DIMS} are read", field="body"
        )
    offset = stream.tell()
    count = math.prod(shape)
    if len(body) - offset != count * dtype.itemsize:
        raise BadRequest(
            f"the .npy header declares {dtype}{list(shape)}, {count * dtype.itemsize} bytes of data, "
            f"but the body holds {len(body) - offset}",
            field="body",
        )
    array: Numeric = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    # Fortran order: the data is the transpose's C-order layout, as np.load reads it.
    array = array.reshape(shape[::-1]).T if fortran_order else array.reshape(shape)
    # A client's header need not pad the data to its dtype's alignment; numpy and onnxruntime expect it.
    return array if array.flags.aligned else array.copy()


def images_from_npy(
    array: Numeric, input_shape: tuple[int, ...], value_range: tuple[float, float], max_batch: int
) -> F32:
    """npy images [batch, D] or [batch, *input_shape]; uint8 means 0-255 pixels."""
    size = math.prod(input_shape)
    if array.ndim < 2 or array.shape[1:] not in ((size,), input_shape) or array.shape[0] == 0:
        raise InvalidInput(
            f"expected an array [batch, {size}] or [batch, {', '.join(map(str, input_shape))}], "
            f"got shape {list(array.shape)}",
            field="inputs",
        )
    check_limit(array.shape[0], max_batch, "inputs", "MAX_BATCH", "the number of images")
    images = _to_float32(array).reshape(array.shape[0], *input_shape)
    if array.dtype == np.uint8:
        images /= np.float32(255)
    _check_values(images, "inputs", [array.ndim == 2] * array.shape[0], input_shape, value_range)
    return images


def latents_from_npy(array: Numeric, latent_dim: int, max_batch: int) -> F32:
    if array.ndim != 2 or array.shape[1] != latent_dim or array.shape[0] == 0:
        raise InvalidInput(
            f"expected an array [batch, {latent_dim}], got shape {list(array.shape)}", field="z"
        )
    check_limit(array.shape[0], max_batch, "z", "MAX_BATCH", "the number of latent vectors")
    latents = _to_float32(array)
    _check_values(latents, "z", [True] * array.shape[0], (latent_dim,), LATENT_RANGE)
    return latents
