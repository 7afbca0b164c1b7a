"""V2 bodies on the wire: JSON tensors and Triton's binary tensor data extension, read against a signature.

No HTTP framework and no model here (the parse pool runs `read_request` in another process): bytes and
the `Inference-Header-Content-Length` header in, checked float32 tensors and parameters out; arrays in,
a response body out.

A request body is one JSON object (`$inference_request`), optionally followed by binary tensor data:

    Inference-Header-Content-Length: 213               the JSON's length; absent: the whole body is JSON
    {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [2, 1, 28, 28],
                 "parameters": {"binary_data_size": 1568}}],
     "outputs": [{"name": "mu", "parameters": {"binary_data": true}}], "parameters": {"seed": 7}}
    <1568 bytes: the images, row-major, little-endian, no padding>

Each input carries either `data` (JSON numbers, flat or nested, row-major) or `binary_data_size`; binary
data follow the JSON in the order of the inputs and must add up to the rest of the body exactly.
Everything a client declares is checked before anything is allocated from it: the header length against
the body, each shape against the signature (and MAX_BATCH), each `binary_data_size` against shape x
datatype and against the bytes left, each JSON tensor's element count against its shape. Values are then
checked element by element by the v1 validators (`service.arrays`): finite, in the model's range.

A response's outputs go as JSON `data` (flat, row-major) or, where asked (`binary_data` on an output,
`binary_data_output` on the request), as binary data after the JSON, with `binary_data_size`.

Every client error is a BadRequest (400) whose message names the input, output or parameter.

About 390 lines in one file: reading and writing share the datatype table and the size arithmetic that
every declared length is checked against, which read best side by side.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import orjson

from service.arrays import images_from_npy, json_type, latents_from_npy
from service.errors import BadRequest, InvalidInput, check_limit
from service.operations import F32
from service.requests import parse_json_object, parse_params
from service.schemas import RequestParams

HEADER_LENGTH = "inference-header-content-length"
"""The binary extension's header: the length of the JSON part of a body that binary tensor data follow."""

DATATYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(kind).newbyteorder("<")
    for name, kind in {
        "BOOL": np.bool_,
        "UINT8": np.uint8,
        "UINT16": np.uint16,
        "UINT32": np.uint32,
        "UINT64": np.uint64,
        "INT8": np.int8,
        "INT16": np.int16,
        "INT32": np.int32,
        "INT64": np.int64,
        "FP16": np.float16,
        "FP32": np.float32,
        "FP64": np.float64,
    }.items()
}
"""The protocol's fixed-size datatypes, little-endian on the wire. BYTES (variable size) is read nowhere."""
DATATYPE_OF = {dtype.newbyteorder("="): name for name, dtype in DATATYPES.items()}

MAX_DIM = 2**63 - 1
"""The protocol allows any unsigned 64-bit dimension; numpy indexes with signed 64-bit integers."""
MAX_RANK = 32
_HEADER_DIGITS = re.compile(r"[0-9]{1,19}")
_JSON_KINDS = {"f": "iuf", "i": "iu", "u": "iu", "b": "b"}
"""Which numpy kinds a JSON array may parse to, by the kind of the declared datatype (numbers for numbers)."""


# ---- what a model takes, and what a request brings -------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """One input of a V2 model: [-1, *shape], -1 the batch axis, in one of `datatypes`."""

    name: str
    kind: Literal["images", "latents"]  # which v1 validator checks the values (`service.arrays`)
    shape: tuple[int, ...]  # without the batch axis
    datatypes: tuple[str, ...]


@dataclass(frozen=True)
class Signature:
    """What one V2 model (NAME.OPERATION) takes and produces, with the limits that apply (picklable)."""

    model: str  # NAME.OPERATION, for messages
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    params: type[RequestParams]
    value_range: tuple[float, float]
    max_batch: int


@dataclass(frozen=True)
class Decoded:
    """A request read and checked: its id, parameters, float32 tensors by name, and the outputs to send as
    (name, binary) in order."""

    id: str | None
    params: RequestParams
    tensors: dict[str, F32]
    outputs: tuple[tuple[str, bool], ...]


# ---- reading a request ---------------------------------------------------------------------------------


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview | None]:
    """(the JSON part, the binary part) of a body, by the Inference-Header-Content-Length header; without
    the header the body is all JSON and there is no binary part (None)."""
    if header_length is None:
        return body, None
    value = header_length.strip()
    if not _HEADER_DIGITS.fullmatch(value):
        raise BadRequest(
            "Inference-Header-Content-Length must be a non-negative integer, the length of the JSON part"
        )
    length = int(value)
    if length == 0:
        raise BadRequest(
            "Inference-Header-Content-Length: 0 (a raw binary request without JSON) is not supported; "
            "send the JSON inference request first and give its length"
        )
    if length > len(body):
        raise BadRequest(f"Inference-Header-Content-Length is {length} but the body holds {len(body)} bytes")
    view = memoryview(body)
    return body[:length], view[length:]


def read_request(body: bytes, header_length: str | None, signature: Signature) -> Decoded:
    """The body of an inference request to `signature`'s model, checked throughout (module docstring)."""
    header, binary = split_body(body, header_length)
    try:
        request = parse_json_object(header)
    except InvalidInput as exc:  # valid JSON, but not an object
        raise BadRequest(f"the inference request: {exc.message}") from None
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(f"id must be a string, got {json_type(request_id)}")
    raw_params = _object(request.get("parameters"), "parameters")
    binary_output = _flag(raw_params.pop("binary_data_output", False), "parameter 'binary_data_output'")
    params = _params(raw_params, signature)
    tensors = _inputs(request.get("inputs"), binary, signature)
    outputs = _outputs(request.get("outputs"), signature, binary_output)
    return Decoded(request_id, params, tensors, outputs)


def _object(value: object, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object, got {json_type(value)}")
    return dict(value)


def _flag(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{what} must be true or false, got {json_type(value)}")
    return value


def _params(raw: dict[str, Any], signature: Signature) -> RequestParams:
    """The operation's settings, validated by the same pydantic model as v1's."""
    accepted = list(signature.params.model_fields)
    for name in raw:
        if name not in accepted:
            takes = ", ".join(accepted) if accepted else "none"
            raise BadRequest(
                f"unknown parameter {name!r}; {signature.model} takes {takes} (and binary_data_output)"
            )
    try:
        return parse_params(signature.params, raw)
    except InvalidInput as exc:
        raise BadRequest(f"parameter {exc.field!r}: {exc.message}") from None


def _inputs(value: object, binary: memoryview | None, signature: Signature) -> dict[str, F32]:
    if not isinstance(value, list):
        raise BadRequest(f"the inference request needs inputs, a list of tensors; got {json_type(value)}")
    specs = {spec.name: spec for spec in signature.inputs}
    items: list[tuple[InputSpec, dict[str, Any]]] = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest(f"inputs[{index}] must be an object with a string name")
        spec = specs.get(item["name"])
        if spec is None:
            taken = ", ".join(specs) if specs else "no inputs"
            raise BadRequest(f"unknown input {item['name']!r}; {signature.model} takes {taken}")
        if any(seen.name == spec.name for seen, _ in items):
            raise BadRequest(f"input {spec.name!r} is given twice")
        items.append((spec, item))
    for spec in signature.inputs:
        if all(seen.name != spec.name for seen, _ in items):
            expected = _shape_text(spec)
            raise BadRequest(f"missing input {spec.name!r} ({' or '.join(spec.datatypes)} {expected})")
    tensors: dict[str, F32] = {}
    offset = 0
    for spec, item in items:
        array, offset = _tensor(spec, item, binary, offset, signature)
        tensors[spec.name] = _checked(spec, array, signature)
    if binary is not None and offset != len(binary):
        raise BadRequest(
            f"the body holds {len(binary)} bytes of binary tensor data after the JSON, but the inputs' "
            f"binary_data_size add up to {offset}"
        )
    return tensors


def _shape_text(spec: InputSpec) -> str:
    return "[" + ", ".join(str(d) for d in (-1, *spec.shape)) + "]"


def _tensor(
    spec: InputSpec, item: dict[str, Any], binary: memoryview | None, offset: int, signature: Signature
) -> tuple[npt.NDArray[Any], int]:
    """One input's array in its declared datatype and shape, and the binary offset after it."""
    name = spec.name
    datatype = item.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        known = ", ".join(DATATYPES)
        got = repr(datatype[:32]) if isinstance(datatype, str) else json_type(datatype)
        raise BadRequest(f"input {name!r}: datatype must be one of {known}; got {got}")
    if datatype not in spec.datatypes:
        raise BadRequest(
            f"input {name!r}: datatype {datatype} is not taken here; send {' or '.join(spec.datatypes)}"
        )
    shape = _shape(item.get("shape"), spec, signature)
    parameters = _object(item.get("parameters"), f"input {name!r}: parameters")
    size = parameters.pop("binary_data_size", None)
    if parameters:
        raise BadRequest(
            f"input {name!r}: parameter {next(iter(parameters))!r} is not supported; inputs take "
            "binary_data_size"
        )
    dtype = DATATYPES[datatype]
    count = math.prod(shape)
    if size is None:
        if "data" not in item:
            raise BadRequest(f"input {name!r} has no data (neither data nor parameters.binary_data_size)")
        return _json_tensor(name, item["data"], datatype, shape, count), offset
    if "data" in item:
        raise BadRequest(f"input {name!r} has both data and parameters.binary_data_size; send one")
    if type(size) is not int or size < 0:
        raise BadRequest(f"input {name!r}: binary_data_size must be a non-negative integer")
    if binary is None:
        raise BadRequest(
            f"input {name!r} has parameters.binary_data_size but the request has no "
            "Inference-Header-Content-Length header (the JSON's length; the binary data follow the JSON)"
        )
    needed = count * dtype.itemsize
    if size != needed:
        raise BadRequest(
            f"input {name!r}: binary_data_size is {size} but {datatype} {list(shape)} takes {needed} bytes"
        )
    if offset + size > len(binary):
        raise BadRequest(
            f"input {name!r}: binary_data_size {size} runs past the end of the body "
            f"({len(binary) - offset} bytes of binary data left)"
        )
    flat: npt.NDArray[Any] = np.frombuffer(binary, dtype=dtype, count=count, offset=offset)
    if not flat.flags.aligned:  # the data need not start at a multiple of the item size
        flat = flat.copy()
    return flat.reshape(shape), offset + size


def _shape(value: object, spec: InputSpec, signature: Signature) -> tuple[int, ...]:
    """The declared shape: [batch, *spec.shape] with 1 <= batch <= MAX_BATCH, checked before any data."""
    name = spec.name
    if (
        not isinstance(value, list)
        or len(value) > MAX_RANK
        or not all(type(d) is int and 0 <= d <= MAX_DIM for d in value)
    ):
        raise BadRequest(
            f"input {name!r}: shape must be a list of non-negative integers, expected {_shape_text(spec)}"
        )
    shape = tuple(value)
    if len(shape) != len(spec.shape) + 1 or shape[1:] != spec.shape or shape[0] < 1:
        raise BadRequest(
            f"input {name!r}: expected shape {_shape_text(spec)} (-1: a batch of at least 1), got {list(shape)}"
        )
    try:
        check_limit(shape[0], signature.max_batch, name, "MAX_BATCH", "the batch")
    except InvalidInput as exc:
        raise BadRequest(f"input {name!r}: {exc.message}") from None
    return shape


def _json_tensor(
    name: str, data: object, datatype: str, shape: tuple[int, ...], count: int
) -> npt.NDArray[Any]:
    """JSON `data` (flat or nested, row-major), shaped: integers and booleans in the datatype, after a range
    check; numbers for a float datatype as parsed (float64 holds every JSON number), for the float32
    validators to convert (they refuse what overflows)."""
    if not isinstance(data, list):
        raise BadRequest(f"input {name!r}: data must be a JSON array, got {json_type(data)}")
    try:
        values = np.asarray(data)
    except (ValueError, TypeError, RecursionError):
        raise BadRequest(
            f"input {name!r}: data must be numbers, flat or nested evenly (not ragged, at most 64 deep)"
        ) from None
    if values.size != count:
        raise BadRequest(
            f"input {name!r}: shape {list(shape)} holds {count} values but data has {values.size}"
        )
    dtype = DATATYPES[datatype].newbyteorder("=")
    if count and values.dtype.kind not in _JSON_KINDS[dtype.kind]:
        wanted = "true or false" if dtype.kind == "b" else "integers" if dtype.kind in "iu" else "numbers"
        raise BadRequest(f"input {name!r}: {datatype} data must be {wanted}")
    if count and dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = values.min(), values.max()
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            raise BadRequest(f"input {name!r}: {bad} is out of {datatype}'s range [{info.min}, {info.max}]")
    return (values if dtype.kind == "f" else values.astype(dtype)).reshape(shape)


def _checked(spec: InputSpec, array: npt.NDArray[Any], signature: Signature) -> F32:
    """float32 values checked element by element by the v1 validators; errors name the input and element."""
    try:
        if spec.kind == "images":
            return images_from_npy(array, spec.shape, signature.value_range, signature.max_batch)
        return latents_from_npy(array, spec.shape[0], signature.max_batch)
    except InvalidInput as exc:
        # The validators name elements "inputs.3.0.12.5" / "z.3.1": batch index, then the index in the item.
        index = (exc.field or "").split(".")[1:]
        where = f" element [{', '.join(index)}]" if index else ""
        raise BadRequest(f"input {spec.name!r}{where}: {exc.message}") from None


def _outputs(value: object, signature: Signature, binary_output: bool) -> tuple[tuple[str, bool], ...]:
    """(name, binary) of the outputs to send, in the order asked; none asked (or []): every output."""
    if value is None or value == []:
        return tuple((name, binary_output) for name in signature.outputs)
    if not isinstance(value, list):
        raise BadRequest(f"outputs must be a list of objects with a name, got {json_type(value)}")
    chosen: list[tuple[str, bool]] = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest(f"outputs[{index}] must be an object with a string name")
        name = item["name"]
        if name not in signature.outputs:
            raise BadRequest(
                f"unknown output {name!r}; {signature.model} produces {', '.join(signature.outputs)}"
            )
        if any(seen == name for seen, _ in chosen):
            raise BadRequest(f"output {name!r} is asked for twice")
        parameters = _object(item.get("parameters"), f"output {name!r}: parameters")
        binary = _flag(parameters.pop("binary_data", binary_output), f"output {name!r}: binary_data")
        if parameters:
            raise BadRequest(
                f"output {name!r}: parameter {next(iter(parameters))!r} is not supported; outputs take "
                "binary_data"
            )
        chosen.append((name, binary))
    return tuple(chosen)


# ---- writing a response --------------------------------------------------------------------------------


def write_response(
    header: dict[str, Any], outputs: list[tuple[str, npt.NDArray[Any], bool]]
) -> tuple[bytes, int | None]:
    """The response body for `header` (model_name, model_version, id, parameters) and its outputs as
    (name, array, binary), and the JSON part's length when binary data follow it (else None)."""
    tensors: list[dict[str, Any]] = []
    chunks: list[npt.NDArray[Any]] = []
    for name, array, binary in outputs:
        native = array.dtype.newbyteorder("=")
        datatype = DATATYPE_OF[native]
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            data = np.ascontiguousarray(array, dtype=DATATYPES[datatype])  # little-endian, row-major
            tensor["parameters"] = {"binary_data_size": data.nbytes}
            chunks.append(data)
        else:
            tensor["data"] = np.ascontiguousarray(array, dtype=native).reshape(
                -1
            )  # orjson writes these natively
        tensors.append(tensor)
    body = orjson.dumps({**header, "outputs": tensors}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return body, None
    return b"".join([body, *(chunk.data for chunk in chunks)]), len(body)
