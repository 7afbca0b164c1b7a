"""The ONNX runtime: execution providers chosen by DEVICE, no silent CPU fallback, failed runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench.standin import rewrite_checksums
from service.manifest import DECODER_FILE
from service.runtime import CPU, CUDA, ProviderUnavailable, select_providers
from service.settings import Device
from tests.service.conftest import (
    LATENT,
    PIXELS,
    VERSIONS,
    serve,
    write_model,
)

pytestmark = pytest.mark.anyio


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
    switched_off: list[ort.InferenceSession] = []
    disable_fallback = ort.InferenceSession.disable_fallback

    def spy(session: ort.InferenceSession) -> None:
        switched_off.append(session)
        disable_fallback(session)

    monkeypatch.setattr(ort.InferenceSession, "disable_fallback", spy)
    async with serve(model_dir) as client:
        assert (await client.get("/readyz")).status_code == 200
    assert len({id(session) for session in switched_off}) == 2 * len(VERSIONS)  # each encoder and decoder


async def test_device_cuda_refuses_to_start_without_a_gpu(model_dir: Path) -> None:
    with pytest.raises(ProviderUnavailable):
        async with serve(model_dir, device="cuda"):
            pass


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
