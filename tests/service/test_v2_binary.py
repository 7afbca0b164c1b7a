"""The V2 wire format without HTTP: bodies split by Inference-Header-Content-Length, tensors read against a
signature (JSON and binary, any alignment), responses written for tritonclient's parser, and what the parse
pool needs (everything pickles)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from tritonclient.http import InferResult

from service.errors import BadRequest
from service.schemas import DecodeParams, EncodeParams
from service.v2_binary import Decoded, InputSpec, Signature, read_request, split_body, write_response
from tests.service.conftest import serve

IMAGES = InputSpec("images", "images", (1, 28, 28), ("FP32", "UINT8"))
ENCODE = Signature("m.encode", (IMAGES,), ("mu", "z"), EncodeParams, (0.0, 1.0), max_batch=8)
DECODE = Signature(
    "m.decode", (InputSpec("z", "latents", (3,), ("FP32",)),), ("samples",), DecodeParams, (0.0, 1.0), 8
)


def binary_body(request: dict[str, object], data: bytes, pad: int = 0) -> tuple[bytes, str]:
    header = json.dumps(request).encode() + b" " * pad
    return header + data, str(len(header))


@pytest.mark.parametrize(
    ("length", "message"),
    [
        ("x", "must be a non-negative integer"),
        ("+3", "must be a non-negative integer"),
        ("12345678901234567890", "must be a non-negative integer"),
        ("0", "not supported"),
        ("11", "is 11 but the body holds 10 bytes"),
    ],
)
def test_header_length_is_checked_against_the_body(length: str, message: str) -> None:
    with pytest.raises(BadRequest, match=message.replace("+", r"\+")):
        split_body(b"0123456789", length)


def test_split_body_without_the_header_is_all_json() -> None:
    assert split_body(b"{}", None) == (b"{}", None)
    header, rest = split_body(b"{}abc", " 2 ")
    assert header == b"{}" and rest is not None and bytes(rest) == b"abc"


@pytest.mark.parametrize("pad", range(4), ids=lambda p: f"offset+{p}")
def test_binary_tensors_at_any_offset_read_the_same(pad: int) -> None:
    z = np.arange(6, dtype=np.float32).reshape(2, 3) / 10
    request = {
        "inputs": [{"name": "z", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 24}}]
    }
    body, length = binary_body(request, z.astype("<f4").tobytes(), pad)
    decoded = read_request(body, length, DECODE)
    assert np.array_equal(decoded.tensors["z"], z) and decoded.tensors["z"].flags.aligned
    assert decoded.outputs == (("samples", False),)


def test_json_tensors_flat_or_nested_and_uint8_pixels() -> None:
    pixels = (np.arange(784) % 256).astype(np.uint8).reshape(1, 1, 28, 28)
    for data in (pixels.tolist(), pixels.ravel().tolist(), pixels.reshape(28, 28).tolist()):
        request = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": data}]}
        decoded = read_request(json.dumps(request).encode(), None, ENCODE)
        assert np.array_equal(decoded.tensors["images"], pixels.astype(np.float32) / np.float32(255))


def test_parameters_outputs_and_id() -> None:
    request = {
        "id": "7",
        "inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784}],
        "parameters": {"samples": 2, "seed": 3.0, "binary_data_output": True},
        "outputs": [{"name": "z"}, {"name": "mu", "parameters": {"binary_data": False}}],
    }
    decoded = read_request(json.dumps(request).encode(), None, ENCODE)
    assert decoded.id == "7" and decoded.params == EncodeParams(samples=2, seed=3)  # 3.0 is an integer
    assert decoded.outputs == (("z", True), ("mu", False))


def test_responses_read_back_with_tritonclient_in_both_encodings() -> None:
    big_endian = np.arange(6, dtype=">f4").reshape(2, 3)
    pixels = np.array([[0, 255]], dtype=np.uint8)
    header = {"model_name": "m.x", "model_version": "1", "id": "a"}
    for binary in (False, True):
        body, length = write_response(header, [("a", big_endian, binary), ("b", pixels, binary)])
        assert (length is None) is not binary
        result = InferResult.from_response_body(body, header_length=length)
        assert result.get_response()["id"] == "a"
        assert np.array_equal(result.as_numpy("a"), big_endian) and result.as_numpy("a").dtype == np.float32
        assert np.array_equal(result.as_numpy("b"), pixels) and result.get_output("b")["datatype"] == "UINT8"
    empty, length = write_response(header, [("z", np.empty((2, 0, 3), np.float32), True)])
    assert InferResult.from_response_body(empty, header_length=length).as_numpy("z").shape == (2, 0, 3)


def test_what_the_parse_pool_sends_and_returns_pickles() -> None:
    decoded = Decoded(
        "1", EncodeParams(samples=1), {"images": np.zeros((1, 1, 28, 28), np.float32)}, (("mu", True),)
    )
    for value in (ENCODE, DECODE):
        assert pickle.loads(pickle.dumps(value)) == value
    again = pickle.loads(pickle.dumps(decoded))
    assert again.params == decoded.params and np.array_equal(
        again.tensors["images"], decoded.tensors["images"]
    )
    error = pickle.loads(pickle.dumps(BadRequest("input 'z': bad")))
    assert isinstance(error, BadRequest) and error.message == "input 'z': bad"


@pytest.mark.anyio
async def test_large_json_bodies_are_read_off_the_event_loop_with_the_same_result(model_dir: Path) -> None:
    """PARSE_OFFLOAD_BYTES=0 sends every body through the parse pool (a thread with PARSE_WORKERS=0)."""
    request = {
        "inputs": [{"name": "images", "datatype": "FP32", "shape": [2, 1, 28, 28], "data": [0.25] * 1568}],
        "parameters": {"samples": 1, "seed": 4},
    }
    answers = []
    for offload in (0, 1 << 30):
        async with serve(model_dir, parse_offload_bytes=offload) as client:
            response = await client.post("/v2/models/tiny.encode/infer", json=request)
            bad = await client.post("/v2/models/tiny.encode/infer", json={"inputs": 1})
        assert response.status_code == 200 and bad.status_code == 400
        answers.append(response.json())
    assert answers[0] == answers[1]
