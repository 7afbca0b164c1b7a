"""Model loading and routing: refusals with reasons, readiness, versions, providers, metadata, metrics."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.batching import Batcher
from service.manifest import DECODER_FILE, ENCODER_FILE, MANIFEST_NAME, read_manifest
from service.registry import ServedModel, version_key
from service.runtime import CPU, CUDA, ProviderUnavailable, select_providers
from service.settings import Device
from tests.service.conftest import (
    LATENT,
    NEWEST,
    PIXELS,
    VERSIONS,
    build_decoder,
    f32,
    rewrite_checksums,
    serve,
    write_model,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sound model and seven broken ones, each broken in a different way, plus a stray file."""
    root = tmp_path_factory.mktemp("mixed")
    write_model(root, "good", "1", seed=0)
    corrupt = write_model(root, "corrupt", "1", seed=1)
    with (corrupt / DECODER_FILE).open("ab") as f:
        f.write(b"\0")
    missing = write_model(root, "missing", "1", seed=2)
    (missing / ENCODER_FILE).unlink()
    invalid = write_model(root, "invalid", "1", seed=3)
    text = (invalid / MANIFEST_NAME).read_text()
    (invalid / MANIFEST_NAME).write_text(text.replace('"latent_dim": 4', '"latent_dim": 0'))
    write_model(root, "mismatch", "1", seed=4, manifest_latent=LATENT + 1)  # checksums fine, graphs disagree
    (root / "nomanifest" / "1").mkdir(parents=True)
    moved = write_model(root, "moved", "1", seed=5)
    moved.rename(root / "moved" / "7")  # manifest says version 1, directory says 7
    baked = write_model(root, "baked", "1", seed=6)  # the export bug of a batch axis fixed at 1
    build_decoder(baked / DECODER_FILE, np.random.default_rng(6), reshape_to=(1, -1, 28, 28))
    rewrite_checksums(baked)
    (root / "README.txt").write_text("not a model")
    return root


EXPECTED_REFUSALS = {
    "corrupt": f"{DECODER_FILE} has sha256",
    "missing": f"{ENCODER_FILE} is missing",
    "invalid": "latent_dim: Input should be greater than or equal to 1",
    "mismatch": "the manifest says 5",
    "nomanifest": f"{MANIFEST_NAME} is missing",
    "moved": "says moved/1 but lives in moved/7",
    "baked": "decoder.onnx: output 'x_mean' has a fixed batch size 1",
}


async def test_broken_models_are_refused_with_reasons_and_the_rest_serve(
    mixed_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="service.registry"):
        async with serve(mixed_dir) as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            body = ready.json()
            assert body["ready"] is False
            assert body["models"] == ["good/1"]
            reasons = {item["model"]: item["reason"] for item in body["not_ready"]}
            assert reasons.keys() == EXPECTED_REFUSALS.keys()
            for name, fragment in EXPECTED_REFUSALS.items():
                assert fragment in reasons[name], reasons[name]
            assert (await client.post("/v1/models/good/sample", json={"n": 1})).status_code == 200
            assert (await client.post("/v1/models/corrupt/sample", json={"n": 1})).status_code == 404
            metrics = (await client.get("/metrics")).text
            assert 'vae_model_loaded{model="good",version="1"} 1.0' in metrics
            assert 'vae_model_loaded{model="corrupt",version="1"} 0.0' in metrics
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(lines) == len(EXPECTED_REFUSALS)  # one line per refused model
    for name in EXPECTED_REFUSALS:
        (line,) = [line for line in lines if line.startswith(f"model {name}/")]
        assert str(mixed_dir / name) in line


async def test_corrupt_onnx_bytes_with_matching_checksum_are_refused(tmp_path: Path) -> None:
    """A manifest that matches garbage: the checksum passes, onnxruntime refuses, the reason says so."""
    directory = write_model(tmp_path, "garbage", "1", seed=0)
    (directory / DECODER_FILE).write_bytes(b"not an onnx graph")
    rewrite_checksums(directory)
    async with serve(tmp_path) as client:
        body = (await client.get("/readyz")).json()
    (item,) = body["not_ready"]
    assert item["model"] == "garbage"
    assert str(directory / DECODER_FILE) in item["reason"]


async def test_empty_model_dir_is_not_ready(tmp_path: Path) -> None:
    async with serve(tmp_path) as client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    assert "no NAME/VERSION/ model directories" in response.json()["not_ready"][0]["reason"]


async def test_missing_model_dir_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        async with serve(tmp_path / "absent"):
            pass


async def test_newest_version_is_numeric_and_each_version_is_addressable(client: httpx.AsyncClient) -> None:
    info = (await client.get("/v1/models/tiny")).json()
    assert info["version"] == NEWEST
    assert info["versions"] == list(VERSIONS)
    assert info["latent_dim"] == LATENT and info["input_shape"] == [1, 28, 28]
    assert info["providers"] == [CPU]
    assert info["graph_providers"] == {"encoder": [CPU], "decoder": [CPU]}
    assert {"name", "likelihood", "dataset", "metrics", "architecture"} <= info.keys()
    pinned = (await client.get("/v1/models/tiny/versions/2")).json()
    assert pinned["version"] == "2"
    listing = (await client.get("/v1/models")).json()
    assert [m["version"] for m in listing["models"]] == [NEWEST]

    request = {"n": 2, "seed": 5}
    newest = (await client.post("/v1/models/tiny/sample", json=request)).json()
    ten = (await client.post(f"/v1/models/tiny/versions/{NEWEST}/sample", json=request)).json()
    two = (await client.post("/v1/models/tiny/versions/2/sample", json=request)).json()
    assert newest == ten
    assert newest["z"] == two["z"]  # same eps ...
    assert not np.allclose(f32(newest["samples"]), f32(two["samples"]))  # ... different decoders


def test_version_order() -> None:
    assert sorted(["10", "2", "1", "beta", "alpha"], key=version_key) == ["alpha", "beta", "1", "2", "10"]


@pytest.mark.parametrize(
    ("device", "available", "expected"),
    [
        ("auto", [CUDA, CPU], [CUDA, CPU]),
        ("auto", [CPU], [CPU]),
        ("auto", ["TensorrtExecutionProvider", CUDA, CPU], [CUDA, CPU]),
        ("cpu", [CUDA, CPU], [CPU]),
        ("cpu", [CPU], [CPU]),
        ("cuda", [CUDA, CPU], [CUDA, CPU]),
    ],
    ids=["auto-gpu", "auto-cpu-only", "auto-ignores-tensorrt", "cpu-despite-gpu", "cpu", "cuda"],
)
def test_select_providers(device: Device, available: list[str], expected: list[str]) -> None:
    assert select_providers(device, available) == expected


def test_cuda_without_cuda_provider_fails_loudly() -> None:
    with pytest.raises(ProviderUnavailable, match="onnxruntime-gpu"):
        select_providers("cuda", [CPU])


async def test_sessions_fail_instead_of_falling_back_to_cpu_inside_a_run(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime's run() would otherwise rebuild a session on CPU after a provider error, under the
    other run in flight; every session the service creates has that fallback switched off."""
    created: list[ort.InferenceSession] = []

    class Recorded(ort.InferenceSession):  # type: ignore[misc]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(ort, "InferenceSession", Recorded)
    async with serve(model_dir) as client:
        assert (await client.get("/readyz")).status_code == 200
    assert len(created) == 2 * len(VERSIONS)  # an encoder and a decoder per version
    assert [session._enable_fallback for session in created] == [False] * len(created)


async def test_each_graphs_providers_are_logged_and_reported(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="service.registry"):
        async with serve(model_dir):
            pass
    assert f"model tiny/{NEWEST} loaded from" in caplog.text
    assert f"encoder on ['{CPU}'], decoder on ['{CPU}']" in caplog.text


def test_providers_are_both_graphs_best_first(model_dir: Path) -> None:
    def batcher() -> Batcher:
        return Batcher(lambda x: [x], name="fake", max_batch_rows=1, window_ms=0, max_queue_rows=1)

    served = ServedModel(
        manifest=read_manifest(model_dir / "tiny" / NEWEST),
        path=model_dir / "tiny" / NEWEST,
        graph_providers={"encoder": [CPU], "decoder": [CUDA, CPU]},
        encoder=batcher(),
        decoder=batcher(),
    )
    assert served.providers == [CUDA, CPU]


async def test_device_cuda_refuses_to_start_without_a_gpu(model_dir: Path) -> None:
    with pytest.raises(ProviderUnavailable):
        async with serve(model_dir, device="cuda"):
            pass


async def test_metrics_count_requests_errors_samples_and_batches(client: httpx.AsyncClient) -> None:
    await client.post("/v1/models/tiny/sample", json={"n": 3})
    await client.post("/v1/models/tiny/sample", json={"n": 0})
    await client.post("/v1/models/no-such-model/sample", json={})
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    sample = 'endpoint="sample",model="tiny"'
    assert f'vae_requests_total{{{sample},status="200"}} 1.0' in text
    assert f'vae_request_errors_total{{{sample},status="422"}} 1.0' in text
    assert 'vae_request_errors_total{endpoint="sample",model="<unknown>",status="404"} 1.0' in text
    assert f"vae_request_duration_seconds_count{{{sample}}} 2.0" in text
    assert f"vae_samples_generated_total{{{sample}}} 3.0" in text
    assert f'vae_model_loaded{{model="tiny",version="{NEWEST}"}} 1.0' in text
    assert f'vae_batch_rows_sum{{graph="decoder",model="tiny",version="{NEWEST}"}} 3.0' in text
    assert "no-such-model" not in text  # unknown names do not mint series


def _flaky_decoder(path: Path) -> None:
    """The tiny decoder, plus a Gather that indexes out of bounds when any z exceeds 100: a model run
    that raises inside onnxruntime for some inputs only, after passing warm-up."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["z", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["flat"]),
        helper.make_node("ReduceMax", ["z"], ["largest"], keepdims=0),
        helper.make_node("Greater", ["largest", "hundred"], ["too_large"]),
        helper.make_node("Cast", ["too_large"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "index"], ["picked"]),
        helper.make_node("Mul", ["picked", "zero"], ["nothing"]),
        helper.make_node("Add", ["flat", "nothing"], ["flat_out"]),
        helper.make_node("Reshape", ["flat_out", "shape"], ["x_mean"]),
    ]
    inits = [
        numpy_helper.from_array(rng.normal(0, 1, (LATENT, PIXELS)).astype(np.float32), "w"),
        numpy_helper.from_array(np.zeros(PIXELS, np.float32), "b"),
        numpy_helper.from_array(np.array(100.0, np.float32), "hundred"),
        numpy_helper.from_array(np.array([0.0], np.float32), "table"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array([-1, 1, 28, 28], np.int64), "shape"),
    ]
    graph = helper.make_graph(
        nodes,
        "flaky_decoder",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", LATENT])],
        [helper.make_tensor_value_info("x_mean", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))


async def test_a_failing_model_run_is_a_500_and_the_service_recovers(tmp_path: Path) -> None:
    directory = write_model(tmp_path, "flaky", "1", seed=0)
    _flaky_decoder(directory / DECODER_FILE)
    rewrite_checksums(directory)
    async with serve(tmp_path) as client:
        assert (await client.get("/readyz")).status_code == 200
        failed = await client.post("/v1/models/flaky/decode", json={"z": [[1000.0, 0.0, 0.0, 0.0]]})
        assert failed.status_code == 500
        assert failed.json()["error"] == {
            "status": 500,
            "field": None,
            "message": "the model run failed; the server log has the details",
        }
        assert (
            await client.post("/v1/models/flaky/decode", json={"z": [[1.0, 0.0, 0.0, 0.0]]})
        ).status_code == 200


async def test_startup_objects_are_frozen_out_of_the_collector_while_serving(model_dir: Path) -> None:
    """The lifespan freezes what start-up made (gc.freeze), so full collections under load stay short."""
    async with serve(model_dir) as client:
        assert (await client.get("/readyz")).status_code == 200
        assert gc.get_freeze_count() > 10_000
    assert gc.get_freeze_count() == 0
