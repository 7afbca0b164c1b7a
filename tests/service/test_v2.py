"""The Open Inference Protocol (V2) routes in process: the model map, metadata, health, both tensor encodings,
v1 equality, errors in the V2 shape, limits, API keys, metrics and the OpenAPI page.

Responses are decoded with tritonclient's own parser (`InferResult.from_response_body`), not ours.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from tritonclient.http import InferResult

from service.app import ServiceApp, create_app
from service.v2_operations import OPERATIONS
from tests.service.conftest import LATENT, NEWEST, VERSIONS, eps_for, image_batch, make_settings, write_model

pytestmark = pytest.mark.anyio

IMAGE = [-1, 1, 28, 28]
Z = [-1, LATENT]
METADATA = {
    "encode": (
        [("images", "FP32", IMAGE)],
        [("mu", "FP32", Z), ("logvar", "FP32", Z), ("sigma", "FP32", Z), ("z", "FP32", [-1, -1, LATENT])],
    ),
    "sample": ([], [("samples", "FP32", IMAGE), ("z", "FP32", Z)]),
    "reconstruct": (
        [("images", "FP32", IMAGE)],
        [("reconstructions", "FP32", IMAGE), ("z", "FP32", Z), ("error", "FP32", [-1])],
    ),
    "decode": ([("z", "FP32", Z)], [("samples", "FP32", IMAGE)]),
    "score": (
        [("images", "FP32", IMAGE)],
        [
            *((name, "FP32", [-1]) for name in ("elbo", "iwae", "kl", "recon_error")),
            ("anomaly_score", "FP32", [-1]),
            ("anomaly_threshold", "FP32", [-1]),
            ("is_anomaly", "BOOL", [-1]),
        ],
    ),
    "interpolate": ([("z", "FP32", Z)], [("images", "FP32", IMAGE), ("z", "FP32", Z), ("t", "FP32", [-1])]),
}
"""The map as a client sees it for the tiny model (input_shape [1, 28, 28], latent_dim 4)."""


@asynccontextmanager
async def running(model_dir: Path, **overrides: Any) -> AsyncIterator[tuple[ServiceApp, httpx.AsyncClient]]:
    app = create_app(make_settings(model_dir, **overrides))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        yield app, client


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def client(model_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    """One app for the tests that change nothing in it (an app costs most of a second to start)."""
    async with running(model_dir) as (_, c):
        yield c


def tensor(name: str, array: np.ndarray, binary: bool) -> tuple[dict[str, Any], bytes]:
    """A request input as a client writes it: JSON data (nested) or binary_data_size and the bytes."""
    datatype = {np.dtype(np.float32): "FP32", np.dtype(np.uint8): "UINT8"}[array.dtype]
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    if not binary:
        return {**entry, "data": array.tolist()}, b""
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return {**entry, "parameters": {"binary_data_size": len(data)}}, data


def body_of(
    request: dict[str, Any], tensors: list[tuple[dict[str, Any], bytes]]
) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({**request, "inputs": [entry for entry, _ in tensors]}).encode()
    data = b"".join(chunk for _, chunk in tensors)
    return header + data, {"Inference-Header-Content-Length": str(len(header))} if data else {}


async def infer(
    client: httpx.AsyncClient,
    model: str,
    inputs: dict[str, np.ndarray],
    *,
    binary: bool = False,
    **request: Any,
) -> InferResult:
    body, headers = body_of(request, [tensor(name, array, binary) for name, array in inputs.items()])
    response = await client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    length = response.headers.get("inference-header-content-length")
    expected = "application/octet-stream" if length is not None else "application/json"
    assert response.headers["content-type"] == expected
    return InferResult.from_response_body(
        response.content, header_length=None if length is None else int(length)
    )


# ---- server, health, metadata --------------------------------------------------------------------------


async def test_server_metadata_lists_exactly_the_extensions_implemented(client: httpx.AsyncClient) -> None:
    for path in ("/v2", "/v2/"):  # the specification writes /v2/, clients /v2
        response = await client.get(path)
        assert response.status_code == 200
        assert response.json() == {
            "name": "vae-serving",
            "version": "1.0.0",
            "extensions": ["binary_tensor_data", "parameters"],
        }


async def test_live_and_ready_follow_healthz_and_readyz(model_dir: Path) -> None:
    async with running(model_dir) as (app, client):
        assert (await client.get("/v2/health/live")).json() == {"live": True}
        ready = await client.get("/v2/health/ready")
        assert (ready.status_code, ready.json()) == (200, {"ready": True})
        app.state.draining = True  # after SIGTERM: /readyz says 503, and so does the V2 probe
        assert (await client.get("/readyz")).status_code == 503
        ready = await client.get("/v2/health/ready")
        assert (ready.status_code, ready.json()) == (503, {"ready": False})
        assert (await client.get("/v2/health/live")).status_code == 200


async def test_readiness_follows_readyz_and_dotted_names_split_at_the_last_dot(tmp_path: Path) -> None:
    write_model(tmp_path, "mnist.v2", "1", seed=0)
    write_model(tmp_path, "broken", "1", seed=0, manifest_latent=LATENT + 1)  # refused: graphs disagree
    async with running(tmp_path) as (_, client):
        assert (await client.get("/readyz")).status_code == 503
        assert (await client.get("/v2/health/ready")).status_code == 503
        ready = await client.get("/v2/models/mnist.v2.sample/ready")
        assert ready.json() == {"name": "mnist.v2.sample", "ready": True}
        assert (await client.get("/v2/models/broken.sample/ready")).status_code == 404
        sampled = await client.post(
            "/v2/models/mnist.v2.sample/infer", json={"inputs": [], "parameters": {"n": 1}}
        )
        assert sampled.json()["model_name"] == "mnist.v2.sample"


@pytest.mark.parametrize("operation", list(METADATA))
async def test_every_operation_is_a_v2_model_named_name_dot_operation(
    client: httpx.AsyncClient, operation: str
) -> None:
    inputs, outputs = METADATA[operation]
    expected = {
        "name": f"tiny.{operation}",
        "versions": list(VERSIONS),
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in inputs],
        "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in outputs],
    }
    assert (await client.get(f"/v2/models/tiny.{operation}")).json() == expected
    assert (await client.get(f"/v2/models/tiny.{operation}/versions/2")).json() == expected
    for path in (
        f"/v2/models/tiny.{operation}/ready",
        f"/v2/models/tiny.{operation}/versions/{NEWEST}/ready",
    ):
        assert (await client.get(path)).json() == {"name": f"tiny.{operation}", "ready": True}


def test_the_table_and_the_map_agree() -> None:
    """Every operation in the table is documented here (adding one is one entry there and one here)."""
    assert list(OPERATIONS) == list(METADATA)


UNKNOWN = [
    ("GET", "/v2/models/nope.encode", "unknown model 'nope.encode'"),
    ("GET", "/v2/models/tiny.nope", "unknown model 'tiny.nope'"),
    ("GET", "/v2/models/tiny", "unknown model 'tiny'"),
    ("GET", "/v2/models/tiny.encode/versions/3", "model 'tiny.encode' has no version '3'"),
    ("GET", "/v2/models/tiny/ready", "unknown model 'tiny'"),
    ("GET", "/v2/models/tiny.sample/versions/3/ready", "has no version '3'; versions: ['2', '10']"),
    ("POST", "/v2/models/nope.sample/infer", "unknown model 'nope.sample'"),
    (
        "POST",
        "/v2/models/tiny.nope/infer",
        "OPERATION one of ['encode', 'sample', 'reconstruct', 'decode', 'score', 'interpolate']",
    ),
    ("POST", "/v2/models/tiny/versions/2/infer", "unknown model 'tiny'"),
    ("POST", "/v2/models/tiny.sample/versions/3/infer", "model 'tiny.sample' has no version '3'"),
]


@pytest.mark.parametrize(("method", "path", "message"), UNKNOWN, ids=[f"{m} {p}" for m, p, _ in UNKNOWN])
async def test_unknown_models_and_versions_are_404_in_the_v2_shape(
    client: httpx.AsyncClient, method: str, path: str, message: str
) -> None:
    response = await client.request(method, path, json={"inputs": []})
    assert response.status_code == 404
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str)
    assert message in body["error"]


async def test_routing_errors_are_in_the_v2_shape_and_v1_keeps_its_own(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v2/models/tiny.sample/infer")).json() == {"error": "Method Not Allowed"}
    assert (await client.get("/v2/no/such/route")).json() == {"error": "Not Found"}
    v1 = (await client.get("/v1/no/such/route")).json()
    assert v1 == {"error": {"status": 404, "field": None, "message": "Not Found"}}


# ---- inference: the same answers as v1 ------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
async def test_every_operation_answers_as_v1_does_bit_for_bit(
    client: httpx.AsyncClient, binary: bool
) -> None:
    x = image_batch(3, seed=4)
    z_in = eps_for(99, (2, LATENT))

    v1 = (
        await client.post("/v1/models/tiny/encode", json={"inputs": x.tolist(), "samples": 2, "seed": 11})
    ).json()
    v2 = await infer(
        client, "tiny.encode", {"images": x}, binary=binary, parameters={"samples": 2, "seed": 11}
    )
    for name in ("mu", "logvar", "sigma", "z"):
        assert np.array_equal(v2.as_numpy(name), np.float32(v1[name])), name
    assert v2.get_response()["parameters"] == {"seed": 11}
    eps = eps_for(11, (3, 2, LATENT))
    assert np.array_equal(v2.as_numpy("z"), v2.as_numpy("mu")[:, None] + v2.as_numpy("sigma")[:, None] * eps)

    v1 = (await client.post("/v1/models/tiny/sample", json={"n": 3, "seed": 5, "temperature": 0.5})).json()
    v2 = await infer(
        client, "tiny.sample", {}, binary=binary, parameters={"n": 3, "seed": 5, "temperature": 0.5}
    )
    assert np.array_equal(v2.as_numpy("z"), np.float32(0.5) * eps_for(5, (3, LATENT)))
    assert np.array_equal(v2.as_numpy("z"), np.float32(v1["z"]))
    assert np.array_equal(v2.as_numpy("samples"), np.float32(v1["samples"]))

    request = {"inputs": x.tolist(), "mode": "sample", "seed": 3, "dtype": "uint8"}
    v1 = (await client.post("/v1/models/tiny/reconstruct", json=request)).json()
    parameters = {"mode": "sample", "seed": 3, "dtype": "uint8"}
    v2 = await infer(client, "tiny.reconstruct", {"images": x}, binary=binary, parameters=parameters)
    assert v2.get_output("reconstructions")["datatype"] == "UINT8"
    assert np.array_equal(v2.as_numpy("reconstructions"), np.uint8(v1["reconstructions"]))
    assert np.array_equal(v2.as_numpy("z"), np.float32(v1["z"]))
    assert np.array_equal(v2.as_numpy("error"), np.float32(v1["error"]))

    v1 = (await client.post("/v1/models/tiny/versions/2/decode", json={"z": z_in.tolist()})).json()
    v2_pinned = "/v2/models/tiny.decode/versions/2/infer"
    body, headers = body_of({}, [tensor("z", z_in, binary)])
    response = await client.post(v2_pinned, content=body, headers=headers)
    length = response.headers.get("inference-header-content-length")
    result = InferResult.from_response_body(
        response.content, header_length=None if length is None else int(length)
    )
    assert result.get_response()["model_version"] == "2" and "parameters" not in result.get_response()
    assert np.array_equal(result.as_numpy("samples"), np.float32(v1["samples"]))


async def test_uint8_images_are_pixels_as_in_v1_npy(client: httpx.AsyncClient) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (2, 1, 28, 28)).astype(np.uint8)
    npy = await client.post(
        "/v1/models/tiny/encode?seed=1",
        content=_npy(pixels),
        headers={"Content-Type": "application/x-npy"},
    )
    v2 = await infer(client, "tiny.encode", {"images": pixels}, binary=True)
    assert np.array_equal(v2.as_numpy("mu"), np.float32(npy.json()["mu"]))
    assert v2.as_numpy("z").shape == (2, 0, LATENT)  # samples 0: no draws, the announced rank


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


async def test_seed_drawn_when_absent_is_returned_and_replays(client: httpx.AsyncClient) -> None:
    first = await infer(client, "tiny.sample", {}, parameters={"n": 2})
    seed = first.get_response()["parameters"]["seed"]
    assert 0 <= seed < 2**53
    again = await infer(client, "tiny.sample", {}, parameters={"n": 2, "seed": seed})
    assert np.array_equal(first.as_numpy("z"), again.as_numpy("z"))
    mean = await infer(client, "tiny.reconstruct", {"images": image_batch(1)}, parameters={"mode": "mean"})
    assert "parameters" not in mean.get_response()  # mode mean draws no eps: no seed


async def test_only_requested_outputs_in_the_order_asked_and_ids_echoed(client: httpx.AsyncClient) -> None:
    outputs = [{"name": "z", "parameters": {"binary_data": True}}, {"name": "mu"}]
    request = {"id": "req-7", "outputs": outputs, "parameters": {"samples": 1, "seed": 2}}
    result = await infer(client, "tiny.encode", {"images": image_batch(2)}, **request)
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_name"] == "tiny.encode"
    assert response["model_version"] == NEWEST
    assert [o["name"] for o in response["outputs"]] == ["z", "mu"]
    assert "data" not in response["outputs"][0] and response["outputs"][0]["parameters"] == {
        "binary_data_size": 32
    }
    assert len(response["outputs"][1]["data"]) == 2 * LATENT  # JSON data: flat, row-major
    assert result.as_numpy("z").shape == (2, 1, LATENT)

    everything = await infer(
        client, "tiny.encode", {"images": image_batch(2)}, parameters={"binary_data_output": True}
    )
    assert [o["name"] for o in everything.get_response()["outputs"]] == ["mu", "logvar", "sigma", "z"]
    assert all("binary_data_size" in o["parameters"] for o in everything.get_response()["outputs"])
    one_json = await infer(
        client,
        "tiny.encode",
        {"images": image_batch(2)},
        parameters={"binary_data_output": True},
        outputs=[{"name": "sigma", "parameters": {"binary_data": False}}],
    )
    assert "data" in one_json.get_response()["outputs"][0]  # binary_data on an output overrides the request's


async def test_json_data_flat_or_nested_and_json_integers_for_fp32(client: httpx.AsyncClient) -> None:
    x = image_batch(2)
    nested = await infer(client, "tiny.encode", {"images": x})
    flat_body = {
        "inputs": [
            {"name": "images", "datatype": "FP32", "shape": [2, 1, 28, 28], "data": x.ravel().tolist()}
        ]
    }
    flat = await client.post("/v2/models/tiny.encode/infer", json=flat_body)
    assert np.array_equal(
        np.float32(flat.json()["outputs"][0]["data"]).reshape(2, LATENT), nested.as_numpy("mu")
    )
    ints = {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, LATENT], "data": [[0, 1, -1, 2]]}]}
    assert (await client.post("/v2/models/tiny.decode/infer", json=ints)).status_code == 200


async def test_binary_data_need_not_be_aligned_and_inputs_may_mix_encodings(
    client: httpx.AsyncClient,
) -> None:
    """A body whose JSON has an odd length puts FP32 data at an odd offset; read it all the same."""
    z = eps_for(4, (1, LATENT))
    data = z.astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "z",
                    "datatype": "FP32",
                    "shape": [1, LATENT],
                    "parameters": {"binary_data_size": 16},
                }
            ]
        }
    ).encode()
    header += b" " * (1 - len(header) % 2)  # odd length
    response = await client.post(
        "/v2/models/tiny.decode/infer",
        content=header + data,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    expected = await infer(client, "tiny.decode", {"z": z})
    assert np.array_equal(
        np.float32(response.json()["outputs"][0]["data"]), expected.as_numpy("samples").ravel()
    )


class Gate(threading.Event):
    """Holds the decoder's runs until set; `entered` is set once a run waits; `rows`: each run's rows."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.rows: list[int] = []


def gate(app: ServiceApp) -> Gate:
    decoder = app.state.registry.resolve("tiny").decoder
    release = Gate()
    real_run = decoder._run

    def gated_run(*inputs: Any) -> Any:
        release.rows.append(len(inputs[0]))
        release.entered.set()
        release.wait(10)
        return real_run(*inputs)

    decoder._run = gated_run
    return release


async def test_v1_and_v2_requests_merge_in_one_batch(model_dir: Path) -> None:
    """Held behind a run in flight, a v1 and a V2 request for the same model share the next run."""
    async with running(model_dir, batch_window_ms=50.0) as (app, client):
        release = gate(app)
        first = asyncio.create_task(client.post("/v1/models/tiny/sample", json={"n": 1, "seed": 1}))
        await asyncio.to_thread(release.entered.wait, 10)
        v1 = asyncio.create_task(client.post("/v1/models/tiny/sample", json={"n": 2, "seed": 2}))
        v2 = asyncio.create_task(
            client.post(
                "/v2/models/tiny.sample/infer", json={"inputs": [], "parameters": {"n": 3, "seed": 2}}
            )
        )
        for _ in range(100):  # let both reach the queue
            await asyncio.sleep(0)
        release.set()
        responses = await asyncio.gather(first, v1, v2)
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert release.rows == [1, 5]  # the second run holds both: 2 rows from v1, 3 from V2
    z_v1 = np.float32(responses[1].json()["z"])
    z_v2 = np.float32(responses[2].json()["outputs"][1]["data"]).reshape(3, LATENT)
    assert np.array_equal(z_v1, z_v2[:2])  # same seed, same first rows of eps


# ---- errors --------------------------------------------------------------------------------------------

IMAGES_OK = {"name": "images", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.5] * 784}
Z_OK = {"name": "z", "datatype": "FP32", "shape": [1, LATENT], "data": [0.0] * LATENT}


def with_input(**changes: Any) -> dict[str, Any]:
    return {"inputs": [{**IMAGES_OK, **changes}]}


def binary_z(
    size: Any, data: bytes, header_length: str | None = None, shape: list[int] | None = None
) -> tuple[bytes, dict[str, str]]:
    entry = {
        "name": "z",
        "datatype": "FP32",
        "shape": shape or [1, LATENT],
        "parameters": {"binary_data_size": size},
    }
    header = json.dumps({"inputs": [entry]}).encode()
    length = str(len(header)) if header_length is None else header_length
    return header + data, {"Inference-Header-Content-Length": length}


Z_BYTES = np.zeros((1, LATENT), "<f4").tobytes()
BAD = [
    # (model, body (JSON value, or (bytes, headers)), words the message must hold)
    ("encode", (b"{", {}), "malformed JSON"),
    ("encode", ([1, 2],), "expected a JSON object"),
    ("encode", ({"inputs": 3},), "needs inputs, a list"),
    (
        "encode",
        ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1], "data": [0]}]},),
        "unknown input 'pixels'; tiny.encode takes images",
    ),
    ("encode", ({"inputs": []},), "missing input 'images' (FP32 or UINT8 [-1, 1, 28, 28])"),
    ("encode", ({"inputs": [IMAGES_OK, IMAGES_OK]},), "input 'images' is given twice"),
    ("encode", (with_input(datatype="FP8"),), "input 'images': datatype must be one of"),
    ("encode", (with_input(datatype="FP64"),), "datatype FP64 is not taken here; send FP32 or UINT8"),
    (
        "encode",
        (with_input(shape=[1, 784]),),
        "expected shape [-1, 1, 28, 28] (-1: a batch of at least 1), got [1, 784]",
    ),
    ("encode", (with_input(shape=[0, 1, 28, 28], data=[]),), "got [0, 1, 28, 28]"),
    (
        "encode",
        (with_input(shape=[2**60, 1, 28, 28]),),
        "the batch is 1152921504606846976; the limit (MAX_BATCH) is 16",
    ),
    ("encode", (with_input(shape=[1, 1, 28, -28]),), "shape must be a list of non-negative integers"),
    ("encode", (with_input(shape=[1, 1, 28, 28.0]),), "shape must be a list of non-negative integers"),
    ("encode", (with_input(shape=[2**64, 1, 28, 28]),), "shape must be a list of non-negative integers"),
    ("encode", (with_input(data=[0.5] * 783),), "shape [1, 1, 28, 28] holds 784 values but data has 783"),
    ("encode", (with_input(data=[[0.5] * 392, [0.5] * 391]),), "nested evenly"),
    ("encode", (with_input(data=["0.5"] * 784),), "FP32 data must be numbers"),
    ("encode", (with_input(data=[None] * 784),), "FP32 data must be numbers"),
    (
        "encode",
        (with_input(data=[0.5] * 783 + [1.5]),),
        "input 'images' element [0, 0, 27, 27]: expected a number in [0, 1], got 1.5",
    ),
    ("encode", (with_input(data=7),), "data must be a JSON array"),
    ("encode", (with_input(datatype="UINT8", data=[300] * 784),), "300 is out of UINT8's range [0, 255]"),
    ("encode", (with_input(datatype="UINT8", data=[0.5] * 784),), "UINT8 data must be integers"),
    ("encode", (with_input(data=None),), "input 'images': data must be a JSON array, got null"),
    ("encode", ({"inputs": [{k: v for k, v in IMAGES_OK.items() if k != "data"}]},), "has no data"),
    (
        "encode",
        (with_input(parameters={"shared_memory_region": "r"}),),
        "parameter 'shared_memory_region' is not supported",
    ),
    (
        "encode",
        ({**with_input(), "parameters": {"sead": 1}},),
        "unknown parameter 'sead'; tiny.encode takes samples, seed",
    ),
    (
        "encode",
        ({**with_input(), "parameters": {"samples": "3"}},),
        "parameter 'samples': Input should be a valid integer",
    ),
    (
        "encode",
        ({**with_input(), "parameters": {"samples": 5000}},),
        "parameter 'samples': images x samples is 5000; the limit (MAX_SAMPLES) is 2048",
    ),
    ("encode", ({**with_input(), "parameters": {"seed": -1}},), "parameter 'seed'"),
    (
        "encode",
        ({**with_input(), "parameters": {"binary_data_output": "yes"}},),
        "binary_data_output' must be true or false",
    ),
    ("encode", ({**with_input(), "parameters": []},), "parameters must be a JSON object"),
    (
        "encode",
        ({**with_input(), "outputs": [{"name": "x_mean"}]},),
        "unknown output 'x_mean'; tiny.encode produces mu, logvar, sigma, z",
    ),
    (
        "encode",
        ({**with_input(), "outputs": [{"name": "mu"}, {"name": "mu"}]},),
        "output 'mu' is asked for twice",
    ),
    (
        "encode",
        ({**with_input(), "outputs": [{"name": "mu", "parameters": {"classification": 3}}]},),
        "parameter 'classification' is not supported",
    ),
    ("encode", ({**with_input(), "outputs": "mu"},), "outputs must be a list"),
    ("encode", ({**with_input(), "id": 42},), "id must be a string"),
    ("sample", ({"inputs": [], "parameters": {"n": 0}},), "parameter 'n'"),
    ("sample", ({"inputs": [], "parameters": {"temperature": 11}},), "parameter 'temperature'"),
    ("reconstruct", ({**with_input(), "parameters": {"mode": "median"}},), "parameter 'mode'"),
    (
        "decode",
        ({"inputs": [{**Z_OK, "data": [1e6] * LATENT}]},),
        "input 'z' element [0, 0]: expected a number in [-1000, 1000]",
    ),
    (
        "decode",
        ((b'{"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 4], "data": [NaN, 0, 0, 0]}]}', {}),),
        "finite",
    ),
    ("decode", ((b"[" * 100_000 + b"]" * 100_000, {}),), "malformed JSON"),
    # the binary tensor data extension
    (
        "decode",
        (binary_z(16, Z_BYTES, header_length="abc"),),
        "Inference-Header-Content-Length must be a non-negative integer",
    ),
    ("decode", (binary_z(16, Z_BYTES, header_length="-5"),), "must be a non-negative integer"),
    (
        "decode",
        (binary_z(16, Z_BYTES, header_length="99999"),),
        "Inference-Header-Content-Length is 99999 but the body holds",
    ),
    ("decode", (binary_z(16, Z_BYTES, header_length="1" * 40),), "must be a non-negative integer"),
    (
        "decode",
        (binary_z(16, Z_BYTES, header_length="0"),),
        "raw binary request without JSON) is not supported",
    ),
    ("decode", (binary_z(-16, Z_BYTES),), "binary_data_size must be a non-negative integer"),
    (
        "decode",
        (binary_z(2**62, Z_BYTES),),
        "binary_data_size is 4611686018427387904 but FP32 [1, 4] takes 16 bytes",
    ),
    ("decode", (binary_z(16.0, Z_BYTES),), "binary_data_size must be a non-negative integer"),
    ("decode", (binary_z(12, Z_BYTES[:12]),), "binary_data_size is 12 but FP32 [1, 4] takes 16 bytes"),
    ("decode", (binary_z(32, Z_BYTES * 2, shape=[2, LATENT + 4]),), "expected shape [-1, 4]"),
    (
        "decode",
        (binary_z(16, Z_BYTES[:8]),),
        "binary_data_size 16 runs past the end of the body (8 bytes of binary data left)",
    ),
    (
        "decode",
        (binary_z(16, Z_BYTES + b"extra"),),
        "21 bytes of binary tensor data after the JSON, but the inputs' binary_data_size add up to 16",
    ),
    (
        "decode",
        (
            (
                json.dumps(
                    {
                        "inputs": [
                            {
                                **{k: v for k, v in Z_OK.items() if k != "data"},
                                "parameters": {"binary_data_size": 16},
                            }
                        ]
                    }
                ).encode(),
                {},
            ),
        ),
        "no Inference-Header-Content-Length header",
    ),
    (
        "decode",
        (
            (
                json.dumps({"inputs": [{**Z_OK, "parameters": {"binary_data_size": 16}}]}).encode() + Z_BYTES,
                {
                    "Inference-Header-Content-Length": str(
                        len(json.dumps({"inputs": [{**Z_OK, "parameters": {"binary_data_size": 16}}]}))
                    )
                },
            ),
        ),
        "has both data and parameters.binary_data_size",
    ),
    (
        "decode",
        (binary_z(2**60 * 16, Z_BYTES, shape=[2**60, LATENT]),),
        "the batch is 1152921504606846976; the limit (MAX_BATCH) is 16",
    ),
]


@pytest.mark.parametrize(
    ("operation", "body", "message"), BAD, ids=[f"{i}-{m[:40]}" for i, (_, _, m) in enumerate(BAD)]
)
async def test_bad_requests_are_400_naming_what_was_wrong(
    client: httpx.AsyncClient, operation: str, body: tuple[Any, ...], message: str
) -> None:
    if len(body) == 1 and not isinstance(body[0], tuple):
        content, headers = json.dumps(body[0]).encode(), {}
    else:
        content, headers = body[0] if len(body) == 1 else body
    response = await client.post(f"/v2/models/tiny.{operation}/infer", content=content, headers=headers)
    assert response.status_code == 400, response.text
    error = response.json()
    assert list(error) == ["error"] and message in error["error"], error
    good = await client.post("/v2/models/tiny.sample/infer", json={"inputs": [], "parameters": {"n": 1}})
    assert good.status_code == 200  # and the next good request still answers


async def test_body_over_the_limit_is_413_in_the_v2_shape(model_dir: Path) -> None:
    """The body limit answers before any route runs; on a V2 path its answer is in the V2 shape."""
    async with running(model_dir, max_body_bytes=4096) as (_, client):
        content = json.dumps({"inputs": [{**IMAGES_OK, "data": [0.123456789] * 784}]}).encode()
        response = await client.post("/v2/models/tiny.encode/infer", content=content)
        assert response.status_code == 413
        assert response.json() == {"error": f"request body is {len(content)} bytes; MAX_BODY_BYTES is 4096"}
        assert int(response.headers["content-length"]) == len(response.content)
        v1 = await client.post("/v1/models/tiny/encode", content=content)
        assert v1.json()["error"]["status"] == 413  # v1 keeps its shape


async def test_full_queue_is_503_with_retry_after_in_the_v2_shape(model_dir: Path) -> None:
    """While a run of 40 rows holds the decoder's queue (limit 64), 40 more are refused at once."""
    async with running(model_dir, max_samples=64, max_batch=4, max_queue_rows=64) as (app, client):
        release = gate(app)
        first = asyncio.create_task(client.post("/v1/models/tiny/sample", json={"n": 40, "seed": 1}))
        await asyncio.to_thread(release.entered.wait, 10)
        response = await client.post(
            "/v2/models/tiny.sample/infer", json={"inputs": [], "parameters": {"n": 40}}
        )
        release.set()
        assert (await first).status_code == 200
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) >= 1
        assert "queue is full" in response.json()["error"]
        ok = await client.post("/v2/models/tiny.sample/infer", json={"inputs": [], "parameters": {"n": 40}})
        assert ok.status_code == 200


async def test_api_keys_guard_v2_but_its_probes(model_dir: Path) -> None:
    key = "alice-0123456789abcdef"
    async with running(model_dir, api_keys=f"alice:{key}") as (_, client):
        for path in ("/v2/health/live", "/v2/health/ready"):
            assert (await client.get(path)).status_code == 200
        for method, path in (
            ("GET", "/v2"),
            ("GET", "/v2/models/tiny.sample"),
            ("POST", "/v2/models/tiny.sample/infer"),
        ):
            refused = await client.request(method, path, json={"inputs": []})
            assert refused.status_code == 401
            assert "API key" in refused.json()["error"] and refused.headers["www-authenticate"].startswith(
                "Bearer"
            )
            allowed = await client.request(method, path, json={"inputs": []}, headers={"X-API-Key": key})
            assert allowed.status_code == 200


async def test_requests_are_counted_by_protocol(model_dir: Path) -> None:
    async with running(model_dir) as (_, client):
        await client.post("/v1/models/tiny/sample", json={"n": 2})
        await client.post("/v2/models/tiny.sample/infer", json={"inputs": [], "parameters": {"n": 3}})
        await client.post("/v2/models/tiny.sample/infer", json={"inputs": [], "parameters": {"n": 0}})
        await client.post("/v2/models/nope.sample/infer", json={"inputs": []})
        await client.get("/v2/models/tiny.sample")
        text = (await client.get("/metrics")).text
    v1, v2 = 'endpoint="sample",model="tiny",protocol="v1"', 'endpoint="sample",model="tiny",protocol="v2"'
    assert f'vae_requests_total{{{v1},status="200"}} 1.0' in text
    assert f'vae_requests_total{{{v2},status="200"}} 1.0' in text
    assert f'vae_request_errors_total{{{v2},status="400"}} 1.0' in text
    assert f"vae_request_duration_seconds_count{{{v2}}} 2.0" in text
    unknown = 'endpoint="sample",model="<unknown>",protocol="v2"'  # unknown names mint no series
    assert f'vae_request_errors_total{{{unknown},status="404"}} 1.0' in text
    assert 'vae_requests_total{endpoint="model_metadata",model="tiny",protocol="v2",status="200"} 1.0' in text
    # eps rows: one counter for both doors
    assert 'vae_samples_generated_total{endpoint="sample",model="tiny"} 5.0' in text
    assert "nope" not in text


async def test_openapi_documents_the_v2_routes(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    paths = document["paths"]
    for operation in OPERATIONS:
        for path in (
            f"/v2/models/{{model}}.{operation}/infer",
            f"/v2/models/{{model}}.{operation}/versions/{{version}}/infer",
        ):
            post = paths[path]["post"]
            body = post["requestBody"]["content"]
            assert {"application/json", "application/octet-stream"} <= body.keys()
            params = body["application/json"]["schema"]["properties"]["parameters"]["properties"]
            assert "binary_data_output" in params
            assert {p["name"] for p in post["parameters"]} >= {"model", "Inference-Header-Content-Length"}
            assert {"200", "400", "404", "413", "503"} <= post["responses"].keys()
            assert "$defs" not in json.dumps(post)
    assert (
        "seed"
        in paths["/v2/models/{model}.encode/infer"]["post"]["requestBody"]["content"]["application/json"][
            "schema"
        ]["properties"]["parameters"]["properties"]
    )
    assert {
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{model}.{operation}",
        "/v2/models/{model}.{operation}/ready",
    } <= paths.keys()
    assert "/v2/" not in paths and "/v2/models/{model}/infer" not in paths  # the fallbacks stay undocumented
