"""Reading a request: its body of any content type, checked down to the element, into parameters and arrays.

Every model operation's body is one of:
  - JSON: an object holding the operation's parameters (`*Params` in `service.schemas`) and its bulk
    array field, if it has one (`inputs` for images, `z` for latents);
  - `application/x-npy`: the bulk array itself, parameters in the query string;
  - nothing: parameters in the query string (only for an operation without a bulk field, `sample`).

Images arrive as, per item of `inputs`:
  - a list of numbers, either flat (`prod(input_shape)` values) or nested in exactly the model's
    `input_shape` (e.g. [1, 28, 28]), values in the manifest's value_range ([0, 1]);
  - a base64 string of an 8-bit grayscale PNG of the model's height and width (pixels / 255), optionally
    as a `data:image/png;base64,` URL;
or the whole body is an `application/x-npy` array [batch, D] or [batch, *input_shape]: uint8 arrays are
pixels (/ 255), other integer and float dtypes are values in [0, 1].

Arrays are parsed by orjson and checked with numpy, not validated by pydantic (for 256 x 784 nested numbers
that would cost far more than the model run), with errors that name the exact element (`inputs.3.12`).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import struct
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import orjson
from PIL import Image
from pydantic import ValidationError
from starlette.requests import Request

from service.errors import BadRequest, InvalidInput, UnsupportedMedia
from service.media import JSON, NPY, content_type
from service.operations import F32
from service.schemas import RequestParams

Numeric = npt.NDArray[np.number[Any]]
"""An array of any integer or float dtype, as clients send it (an .npy body, a parsed JSON list)."""

P = TypeVar("P", bound=RequestParams)
MISSING = object()

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FLOAT32_MAX = float(np.finfo(np.float32).max)
LATENT_RANGE = (-1000.0, 1000.0)
"""z beyond a thousand prior standard deviations is numerically meaningless (and can overflow to NaN)."""


@dataclass(frozen=True)
class Images:
    """The `inputs` an operation reads: images of `shape` with values in `value_range`, at most `max_rows`."""

    shape: tuple[int, ...]
    value_range: tuple[float, float]
    max_rows: int
    field = "inputs"


@dataclass(frozen=True)
class Latents:
    """The `z` an operation reads: latent vectors of `dim` numbers, at most `max_rows`."""

    dim: int
    max_rows: int
    field = "z"


async def read_params(request: Request, model: type[P]) -> P:
    """The parameters of an operation without a bulk array (a JSON body, or none and the query string)."""
    params, _ = parse_body(await request.body(), content_type(request.headers), _query(request), model, None)
    return params


async def read_arrays(request: Request, model: type[P], spec: Images | Latents) -> tuple[P, F32]:
    """The parameters and the checked float32 array of an operation with a bulk field (JSON or .npy body)."""
    params, array = parse_body(
        await request.body(), content_type(request.headers), _query(request), model, spec
    )
    assert array is not None  # parse_body returns an array whenever it is given a spec
    return params, array


def _query(request: Request) -> dict[str, str]:
    return dict(request.query_params) if request.scope["query_string"] else {}


def parse_body(
    body: bytes, media: str, query: dict[str, str], model: type[P], spec: Images | Latents | None
) -> tuple[P, F32 | None]:
    """(validated parameters, the checked array or None) from a JSON, .npy or empty body (module docstring)."""
    if media == NPY:
        if spec is None:
            raise UnsupportedMedia("this endpoint takes a JSON body (or none)", field="body")
        return parse_params(model, query, from_query=True), _npy_array(read_npy(body), spec)
    if media not in ("", JSON):
        accepted = "application/json" if spec is None else "application/json or application/x-npy"
        raise UnsupportedMedia(f"Content-Type {media!r} is not read here; send {accepted}", field="body")
    data = parse_json_object(body)
    if not body.strip():  # no body, not an empty object: `{}` with a query string is still both at once
        params = parse_params(model, query, from_query=True)
    elif query:
        raise InvalidInput("with a JSON body, send every parameter in the body", field="query")
    else:
        value = data.pop(spec.field, MISSING) if spec else None
        params = parse_params(model, data)
        if spec is None:
            return params, None
        if value is not MISSING:
            return params, _json_array(value, spec)
    if spec is not None:
        raise InvalidInput("field required", field=spec.field)
    return params, None


def _json_array(value: object, spec: Images | Latents) -> F32:
    if isinstance(spec, Images):
        return parse_images(value, spec.shape, spec.value_range, spec.max_rows)
    return parse_latents(value, spec.dim, spec.max_rows)


def _npy_array(array: Numeric, spec: Images | Latents) -> F32:
    if isinstance(spec, Images):
        return images_from_npy(array, spec.shape, spec.value_range, spec.max_rows)
    return latents_from_npy(array, spec.dim, spec.max_rows)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; empty means {} (all defaults).

    orjson rejects NaN, Infinity and numbers beyond float64 as malformed. Python's json reads them, so on
    that (rare) path it re-parses, and the field checks downstream then refuse the value with a 422 that
    names its field instead of a 400 about a character position.
    """
    if not body.strip():
        return {}
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise BadRequest(f"malformed JSON: {exc}", field="body") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"expected a JSON object, got {json_type(data)}", field="body")
    return data


def parse_params(model: type[P], data: dict[str, Any], *, from_query: bool = False) -> P:
    """Validate small fields: strictly from JSON (no "3" for 3), leniently from query strings."""
    try:
        return model.model_validate(data, strict=not from_query)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "body"
        if err["type"] == "extra_forbidden":
            raise InvalidInput(
                f"unknown field; expected one of {sorted(model.model_fields)}", field=field
            ) from None
        raise InvalidInput(str(err["msg"]), field=field) from None


def check_limit(value: int, limit: int, field: str, setting: str, what: str) -> None:
    if value > limit:
        raise InvalidInput(f"{what} is {value}; the limit ({setting}) is {limit}", field=field)


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


FLOAT32_MAX = float(np.finfo(np.float32).max)
LATENT_RANGE = (-1000.0, 1000.0)
"""z beyond a thousand prior standard deviations is numerically meaningless (and can overflow to NaN)."""


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


def _png_pixels(text: str, path: str, input_shape: tuple[int, ...]) -> F32:
    """An 8-bit grayscale PNG of the model's height x width, as values in [0, 1]."""
    if len(input_shape) == 3 and input_shape[0] == 1:
        height, width = input_shape[1:]
    elif len(input_shape) == 2:
        height, width = input_shape
    else:
        raise InvalidInput(
            f"this model's input shape {list(input_shape)} cannot come as a grayscale PNG; send numbers",
            field=path,
        )
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if header != "data:image/png;base64":
            raise InvalidInput(f"expected a data:image/png;base64 URL, got {header!r}", field=path)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("expected a base64-encoded PNG (or a list of numbers)", field=path) from None
    # Read the size from the IHDR chunk ourselves so an oversized image is refused before Pillow decodes it.
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise InvalidInput("base64 data is not a PNG", field=path)
    png_width, png_height = struct.unpack(">II", data[16:24])
    if (png_width, png_height) != (width, height):
        raise InvalidInput(f"expected a {width}x{height} PNG, got {png_width}x{png_height}", field=path)
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            if image.mode != "L":
                raise InvalidInput(
                    f"expected an 8-bit grayscale PNG (mode L), got mode {image.mode}", field=path
                )
            pixels = np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidInput(f"unreadable PNG: {exc}", field=path) from None
    return (pixels.astype(np.float32) / np.float32(255)).reshape(input_shape)


def _one_image(item: object, path: str, input_shape: tuple[int, ...]) -> tuple[F32, bool]:
    """One request item -> (image in input_shape, whether the client sent it flat)."""
    size = math.prod(input_shape)
    if isinstance(item, str):
        return _png_pixels(item, path, input_shape), True
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
        parsed = [_one_image(item, f"{field}.{i}", input_shape) for i, item in enumerate(value)]
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
