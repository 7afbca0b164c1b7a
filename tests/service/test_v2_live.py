"""V2 against a real server: `python -m service` on a free loopback port, spoken to by Triton's own Python
client (`tritonclient.http`, and its asyncio client), by hand-made bodies over the wire, and by schemathesis
driven by the official Open Inference Protocol OpenAPI document.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from schemathesis import GenerationMode, openapi
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from tritonclient.utils import InferenceServerException

from bench.standin import write_model
from service.v2_operations import OPERATIONS
from tests.service.conftest import eps_for, image_batch

ROOT = Path(__file__).resolve().parents[2]
SPEC = Path("/work/shared/specs/open-inference-protocol/open_inference_rest.yaml")
LATENT = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """host:port of `python -m service` serving tiny/1 (a stand-in: latent 4, no hidden layer)."""
    models = tmp_path_factory.mktemp("v2-models")
    write_model(models, "tiny", "1", seed=0, hidden=(), latent=LATENT)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MODEL_DIR": str(models),
        "HOST": "127.0.0.1",
        "PORT": "0",  # the kernel picks a free port; uvicorn logs which
        "PARSE_WORKERS": "0",
        "INTRA_OP_THREADS": "1",
        "ACCESS_LOG": "false",
        "DRAIN_SECONDS": "0",
        "API_KEYS": "",
    }
    lines: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=models,  # no stray .env
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, stopped whatever happens
    ) as process:
        assert process.stdout is not None
        reader = threading.Thread(target=lambda: lines.extend(process.stdout or ()), daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 60
            port = None
            while port is None and time.monotonic() < deadline and process.poll() is None:
                found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", "".join(lines))
                port = found[1] if found else time.sleep(0.05)
            if port is None:
                pytest.fail("the server did not start:\n" + "".join(lines))
            yield f"127.0.0.1:{port}"
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            reader.join(timeout=10)


@pytest.fixture
def client(server: str) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(server) as c:
        yield c


def v1(server: str, operation: str, request: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"http://{server}/v1/models/tiny/{operation}", json=request, timeout=10)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def infer_input(name: str, array: np.ndarray, binary: bool) -> triton.InferInput:
    datatype = {np.dtype(np.float32): "FP32", np.dtype(np.uint8): "UINT8"}[array.dtype]
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


# ---- tritonclient ----------------------------------------------------------------------------------------


def test_health_readiness_and_metadata_through_tritonclient(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["extensions"] == ["binary_tensor_data", "parameters"]
    for operation in OPERATIONS:
        assert client.is_model_ready(f"tiny.{operation}") and client.is_model_ready(f"tiny.{operation}", "1")
    assert not client.is_model_ready("tiny.nope") and not client.is_model_ready("tiny.sample", "2")
    encode = client.get_model_metadata("tiny.encode", "1")
    assert encode["versions"] == ["1"] and encode["platform"] == "onnxruntime_onnx"
    assert encode["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert [(o["name"], o["shape"]) for o in encode["outputs"]] == [
        ("mu", [-1, LATENT]),
        ("logvar", [-1, LATENT]),
        ("sigma", [-1, LATENT]),
        ("z", [-1, -1, LATENT]),
    ]


CASES: list[tuple[str, dict[str, np.ndarray], dict[str, Any], dict[str, Any]]] = [
    # (operation, V2 inputs, V2 parameters, the same request to v1)
    (
        "encode",
        {"images": image_batch(3, seed=1)},
        {"samples": 2, "seed": 11},
        {"inputs": image_batch(3, seed=1).tolist(), "samples": 2, "seed": 11},
    ),
    ("sample", {}, {"n": 3, "seed": 5, "temperature": 0.7}, {"n": 3, "seed": 5, "temperature": 0.7}),
    (
        "reconstruct",
        {"images": image_batch(2, seed=2)},
        {"mode": "sample", "seed": 3},
        {"inputs": image_batch(2, seed=2).tolist(), "mode": "sample", "seed": 3},
    ),
    ("decode", {"z": eps_for(8, (2, LATENT))}, {}, {"z": eps_for(8, (2, LATENT)).tolist()}),
]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize(
    ("operation", "inputs", "parameters", "request_v1"), CASES, ids=[c[0] for c in CASES]
)
def test_every_operation_round_trips_and_equals_v1_bit_for_bit(
    server: str,
    client: triton.InferenceServerClient,
    operation: str,
    inputs: dict[str, np.ndarray],
    parameters: dict[str, Any],
    request_v1: dict[str, Any],
    binary: bool,
) -> None:
    names = [tensor.name for tensor in OPERATIONS[operation].outputs]
    result = client.infer(
        f"tiny.{operation}",
        [infer_input(name, array, binary) for name, array in inputs.items()],
        outputs=[triton.InferRequestedOutput(name, binary_data=binary) for name in names],
        parameters=parameters or None,
        request_id=f"{operation}-{binary}",
    )
    response = result.get_response()
    assert response["id"] == f"{operation}-{binary}" and response["model_version"] == "1"
    assert response.get("parameters", {}).get("seed") == parameters.get("seed")
    expected = v1(server, operation, request_v1)
    for name in names:  # V2 outputs are named as v1's JSON fields
        assert np.array_equal(result.as_numpy(name), np.float32(expected[name])), name


def test_default_outputs_come_back_binary_and_complete(client: triton.InferenceServerClient) -> None:
    """Without `outputs`, tritonclient asks for every output in binary (binary_data_output)."""
    result = client.infer(
        "tiny.encode", [infer_input("images", image_batch(2), True)], parameters={"seed": 1}
    )
    outputs = result.get_response()["outputs"]
    assert [o["name"] for o in outputs] == ["mu", "logvar", "sigma", "z"]
    assert all("data" not in o and "binary_data_size" in o["parameters"] for o in outputs)
    assert result.as_numpy("z").shape == (2, 0, LATENT)
    pixels = np.full((1, 1, 28, 28), 255, np.uint8)
    as_uint8 = client.infer(
        "tiny.reconstruct", [infer_input("images", pixels, True)], parameters={"dtype": "uint8"}
    )
    assert as_uint8.as_numpy("reconstructions").dtype == np.uint8


def test_64_concurrent_asyncio_requests_answer_as_sequential_ones_do(server: str) -> None:
    """64 requests at once are batched together; each answer matches the same request made alone, row by row
    (eps exactly; network outputs to 1e-5, as a batched matrix product may round differently)."""

    def request(i: int) -> tuple[str, list[triton.InferInput], dict[str, Any]]:
        if i % 2:
            return "tiny.sample", [], {"n": 1 + i % 3, "seed": i}
        images = infer_input("images", image_batch(1 + i % 3, seed=i), binary=i % 4 == 0)
        return "tiny.reconstruct", [images], {"mode": "sample", "seed": i}

    async def run() -> tuple[list[triton.InferResult], list[triton.InferResult]]:
        async with triton_aio.InferenceServerClient(server) as aio:
            together = await asyncio.gather(
                *(
                    aio.infer(model, inputs, parameters=params)
                    for model, inputs, params in map(request, range(64))
                )
            )
            alone = [
                await aio.infer(model, inputs, parameters=params)
                for model, inputs, params in map(request, range(64))
            ]
        return list(together), alone

    merged_before = _merged_requests(server)
    together, alone = asyncio.run(run())
    assert _merged_requests(server) > merged_before  # some runs did hold several requests
    for i, (a, b) in enumerate(zip(together, alone, strict=True)):
        if i % 2:
            assert np.array_equal(a.as_numpy("z"), np.float32(1.0) * eps_for(i, (1 + i % 3, LATENT)))
            assert np.array_equal(a.as_numpy("z"), b.as_numpy("z"))
            np.testing.assert_allclose(a.as_numpy("samples"), b.as_numpy("samples"), rtol=0, atol=1e-5)
        else:
            for name in ("reconstructions", "z", "error"):
                np.testing.assert_allclose(
                    a.as_numpy(name), b.as_numpy(name), rtol=0, atol=1e-5, err_msg=name
                )


def _merged_requests(server: str) -> float:
    """Requests beyond the first in each decoder run so far (sum - count of vae_batch_requests)."""
    text = httpx.get(f"http://{server}/metrics", timeout=10).text
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "vae_batch_requests"
        for sample in family.samples
        if sample.labels.get("graph") == "decoder" and sample.name.endswith(("_sum", "_count"))
    }
    return values.get("vae_batch_requests_sum", 0.0) - values.get("vae_batch_requests_count", 0.0)


def test_tritonclient_raises_with_the_servers_message(client: triton.InferenceServerClient) -> None:
    bright = np.full((1, 1, 28, 28), 2.0, np.float32)
    with pytest.raises(InferenceServerException) as raised:
        client.infer("tiny.encode", [infer_input("images", bright, True)])
    assert raised.value.status() == "400"
    assert raised.value.message() == "input 'images' element [0, 0, 0, 0]: expected a number in [0, 1], got 2"
    with pytest.raises(InferenceServerException) as raised:
        client.infer("tiny.encode", [infer_input("images", bright[:, 0], True)])
    assert "expected shape [-1, 1, 28, 28]" in raised.value.message()
    with pytest.raises(InferenceServerException) as raised:
        client.infer("tiny.sample", [], parameters={"n": 2, "sed": 1})
    assert "unknown parameter 'sed'; tiny.sample takes n, temperature, seed, dtype" in raised.value.message()
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata("tiny.nope")
    assert raised.value.status() == "404" and "unknown model 'tiny.nope'" in raised.value.message()


# ---- bad bodies over the wire ----------------------------------------------------------------------------


def _binary_request(
    size: Any, shape: list[int], data: bytes, header_length: str | None = None
) -> tuple[bytes, dict[str, str]]:
    entry = {"name": "z", "datatype": "FP32", "shape": shape, "parameters": {"binary_data_size": size}}
    header = json.dumps({"inputs": [entry]}).encode()
    return header + data, {"Inference-Header-Content-Length": header_length or str(len(header))}


Z = np.zeros((1, LATENT), "<f4").tobytes()
WIRE = {
    "header length past the body": _binary_request(16, [1, LATENT], Z, header_length="1000000"),
    "header length not a number": _binary_request(16, [1, LATENT], Z, header_length="12 bytes"),
    "negative binary_data_size": _binary_request(-1, [1, LATENT], Z),
    "huge binary_data_size": _binary_request(2**63 - 1, [1, LATENT], Z),
    "size not shape x datatype": _binary_request(15, [1, LATENT], Z[:15]),
    "sizes not adding up": _binary_request(16, [1, LATENT], Z + Z),
    "a dimension of 2^60": _binary_request(16, [1, 2**60], Z),
    "a batch of 2^60": _binary_request(2**60 * 16, [2**60, LATENT], Z),
    "JSON nested 100k deep": (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}),
}


@pytest.mark.parametrize("name", list(WIRE))
def test_bad_binary_bodies_are_a_clear_400_and_the_next_request_answers(server: str, name: str) -> None:
    content, headers = WIRE[name]
    with httpx.Client(base_url=f"http://{server}", timeout=10) as http:
        response = http.post("/v2/models/tiny.decode/infer", content=content, headers=headers)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert isinstance(error, str) and len(error) < 300, error
        good = http.post(
            "/v2/models/tiny.decode/infer",
            json={"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, LATENT], "data": [0, 0, 0, 0]}]},
        )
        assert good.status_code == 200


# ---- the official OpenAPI document ---------------------------------------------------------------------


def official_spec(model: str = "tiny", version: str = "1") -> dict[str, Any]:
    """The KServe document with its `${MODEL_NAME}` / `${MODEL_VERSION}` paths made concrete: for each V2
    model, the pinned path as written and the unpinned one."""
    document: dict[str, Any] = yaml.safe_load(SPEC.read_text())
    paths: dict[str, Any] = {}
    for path, item in document["paths"].items():
        if "${MODEL_NAME}" not in path:
            paths[path] = item
            continue
        for operation in OPERATIONS:
            for pinned in (True, False):
                concrete = path.replace("${MODEL_NAME}", f"{model}.{operation}")
                concrete = (
                    concrete.replace("${MODEL_VERSION}", version)
                    if pinned
                    else concrete.replace("/versions/${MODEL_VERSION}", "")
                )
                copied = copy.deepcopy(item)
                copied.pop("parameters")  # the path parameters, now spelled out
                for method in copied.values():
                    method["operationId"] += concrete
                paths[concrete] = copied
    document["paths"] = paths
    return document


VALID = {
    "encode": {
        "inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [9] * 784}]
    },
    "sample": {"inputs": [], "parameters": {"n": 2}, "id": "s"},
    "reconstruct": {
        "inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.5] * 784}]
    },
    "decode": {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, LATENT], "data": [0.0] * LATENT}]},
}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.mark.skipif(not SPEC.exists(), reason=f"{SPEC} is absent")
def test_the_official_openapi_document_finds_no_5xx_and_no_nonconforming_response(server: str) -> None:
    """Generated requests, valid and invalid per the document, against every V2 route: no 5xx, no status the
    document does not list, no response body outside its schemas. A fixed seed, a bounded number of
    examples; then one valid request per model, whose 200 must conform too."""
    schema = openapi.from_dict(official_spec())
    base_url = f"http://{server}"
    strategy = st.one_of(
        schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE)
    )
    statuses: list[int] = []

    @settings(
        max_examples=100,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def conforms(case: Any) -> None:
        response = case.call(base_url=base_url)
        statuses.append(response.status_code)
        case.validate_response(response, checks=CHECKS)

    conforms()
    assert statuses and max(statuses) < 500
    for operation, body in VALID.items():
        for path in (f"/v2/models/tiny.{operation}/infer", f"/v2/models/tiny.{operation}/versions/1/infer"):
            case = schema[path]["POST"].Case(body=body, media_type="application/json")
            response = case.call(base_url=base_url)
            assert response.status_code == 200, response.text
            case.validate_response(response, checks=CHECKS)
