"""Reading a request: its body of any content type, checked down to the element, into parameters and arrays.

Every model operation's body is one of:
  - JSON: an object holding the operation's parameters (`*Params` in `service.schemas`) and its bulk
    array field, if it has one (`inputs` for images, `z` for latents);
  - `application/x-npy`: the bulk array itself, parameters in the query string;
  - nothing: parameters in the query string (only for an operation without a bulk field, `sample`).

Parameters may come from the query string with any body; one given in both a JSON body and the query
string takes the query's value. JSON integers include integral floats (3.0), as in JSON Schema.

The arrays themselves (nested JSON numbers, base64 PNGs, .npy files) are checked in `service.arrays`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeVar, get_args

import orjson
from pydantic import ValidationError
from starlette.requests import Request

from service.arrays import (
    Numeric,
    images_from_npy,
    json_type,
    latents_from_npy,
    parse_images,
    parse_latents,
    read_npy,
)
from service.errors import BadRequest, InvalidInput, UnsupportedMedia
from service.media import JSON, NPY, content_type
from service.operations import F32
from service.parse_pool import ParsePool
from service.schemas import RequestParams

P = TypeVar("P", bound=RequestParams)
MISSING = object()


@dataclass(frozen=True)
class Images:
    """The `inputs` an operation reads: images of `shape` with values in `value_range`, at most `max_rows`."""

    shape: tuple[int, ...]
    value_range: tuple[float, float]
    max_rows: int
    max_png_bytes: int
    field = "inputs"


@dataclass(frozen=True)
class Latents:
    """The `z` an operation reads: latent vectors of `dim` numbers, at most `max_rows`."""

    dim: int
    max_rows: int
    field = "z"


async def read_params(request: Request, model: type[P]) -> P:
    """The parameters of an operation without a bulk array (a JSON body, or none and the query string)."""
    params, _ = await _parse(request, model, None)
    return params


async def read_arrays(request: Request, model: type[P], spec: Images | Latents) -> tuple[P, F32]:
    """The parameters and the checked float32 array of an operation with a bulk field (JSON or .npy body)."""
    params, array = await _parse(request, model, spec)
    assert array is not None  # parse_body returns an array whenever it is given a spec
    return params, array


async def _parse(request: Request, model: type[P], spec: Images | Latents | None) -> tuple[P, F32 | None]:
    """parse_body, on the event loop for small or .npy bodies, else in the app's ParsePool."""
    body = await request.body()
    media = content_type(request.headers)
    pool: ParsePool = request.app.state.parse_pool
    if media != NPY and pool.offloads(len(body)):
        return await pool.run(parse_body, body, media, _query(request), model, spec)
    return parse_body(body, media, _query(request), model, spec)


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
    value = data.pop(spec.field, MISSING) if spec else MISSING
    params = _merged_params(model, data, query)
    if spec is None:
        return params, None
    if value is MISSING:
        raise InvalidInput("field required", field=spec.field)
    return params, _json_array(value, spec)


def _merged_params(model: type[P], data: dict[str, Any], query: dict[str, str]) -> P:
    """Parameters from a JSON body and the query string; a parameter in both takes the query's value (so a
    saved body can be re-run with `?seed=...`). Each source is validated by its own rules first."""
    if not query:
        return parse_params(model, data)
    from_body = parse_params(model, data).model_dump(exclude_unset=True)
    from_query = parse_params(model, query, from_query=True).model_dump(exclude_unset=True)
    return parse_params(model, {**from_body, **from_query})


def _integral(model: type[RequestParams], name: str, value: object) -> object:
    """3.0 -> 3 for an integer field (JSON Schema's integers include 3.0); anything else unchanged."""
    field = model.model_fields.get(name)
    if type(value) is float and value.is_integer() and field is not None and _takes_int(field.annotation):
        return int(value)
    return value


def _takes_int(annotation: object) -> bool:
    return annotation is int or int in get_args(annotation)


def _json_array(value: object, spec: Images | Latents) -> F32:
    if isinstance(spec, Images):
        return parse_images(value, spec.shape, spec.value_range, spec.max_rows, spec.max_png_bytes)
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
    """Validate small fields: strictly from JSON (no "3" for 3, but 3.0 is 3, as JSON Schema says), leniently
    from query strings."""
    if not from_query:
        data = {name: _integral(model, name, value) for name, value in data.items()}
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
