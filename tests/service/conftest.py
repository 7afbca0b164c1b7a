"""Fixtures for the service tests: a tiny VAE built with onnx.helper (no torch), apps and httpx clients.

The tiny model has the real contract (x [batch, 1, 28, 28] -> mu, logvar [batch, 4]; z [batch, 4] ->
x_mean [batch, 1, 28, 28]) with a dynamic batch axis, so every route runs end to end in milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.app import create_app
from service.manifest import (
    DECODER_FILE,
    ENCODER_FILE,
    ExportCheck,
    FileEntry,
    Manifest,
    Metrics,
    ModelFiles,
    TrainingRecord,
    read_manifest,
    sha256_file,
    write_manifest,
)
from service.settings import Settings

INPUT_SHAPE = (1, 28, 28)
PIXELS = math.prod(INPUT_SHAPE)
LATENT = 4
MODEL = "tiny"
VERSIONS = ("2", "10")  # numeric ordering: 10 is the newest, though "10" < "2" as strings
NEWEST = "10"


def _initializer(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def build_encoder(path: Path, rng: np.random.Generator, latent: int = LATENT) -> None:
    """x -> Flatten -> MatMul/Add -> mu; MatMul/Add -> 2 tanh(.) -> logvar (bounded, like a clamp)."""
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w_mu"], ["mu_raw"]),
        helper.make_node("Add", ["mu_raw", "b_mu"], ["mu"]),
        helper.make_node("MatMul", ["flat", "w_lv"], ["lv_raw"]),
        helper.make_node("Add", ["lv_raw", "b_lv"], ["lv_lin"]),
        helper.make_node("Tanh", ["lv_lin"], ["lv_tanh"]),
        helper.make_node("Mul", ["lv_tanh", "two"], ["logvar"]),
    ]
    inits = [
        _initializer("w_mu", rng.normal(0, 0.05, (PIXELS, latent))),
        _initializer("b_mu", rng.normal(0, 0.5, (latent,))),
        _initializer("w_lv", rng.normal(0, 0.05, (PIXELS, latent))),
        _initializer("b_lv", rng.normal(0, 0.5, (latent,))),
        _initializer("two", np.array(2.0)),
    ]
    graph = helper.make_graph(
        nodes,
        "encoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *INPUT_SHAPE])],
        [
            helper.make_tensor_value_info("mu", TensorProto.FLOAT, ["batch", latent]),
            helper.make_tensor_value_info("logvar", TensorProto.FLOAT, ["batch", latent]),
        ],
        inits,
    )
    _save(graph, path)


def build_decoder(
    path: Path,
    rng: np.random.Generator,
    latent: int = LATENT,
    reshape_to: tuple[int, ...] = (-1, *INPUT_SHAPE),
) -> None:
    """z -> MatMul/Add -> Sigmoid -> Reshape [batch, 1, 28, 28] (or to `reshape_to`, to break it)."""
    nodes = [
        helper.make_node("MatMul", ["z", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["flat"]),
        helper.make_node("Reshape", ["flat", "shape"], ["x_mean"]),
    ]
    inits = [
        _initializer("w", rng.normal(0, 1.0, (latent, PIXELS))),
        _initializer("b", rng.normal(0, 0.5, (PIXELS,))),
        numpy_helper.from_array(np.array(reshape_to, dtype=np.int64), "shape"),
    ]
    graph = helper.make_graph(
        nodes,
        "decoder",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", latent])],
        [helper.make_tensor_value_info("x_mean", TensorProto.FLOAT, ["batch", *INPUT_SHAPE])],
        inits,
    )
    _save(graph, path)


def write_model(root: Path, name: str, version: str, seed: int, *, manifest_latent: int = LATENT) -> Path:
    """A complete model directory root/name/version with a manifest carrying the real checksums."""
    directory = root / name / version
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    build_encoder(directory / ENCODER_FILE, rng)
    build_decoder(directory / DECODER_FILE, rng)
    manifest = Manifest(
        name=name,
        version=version,
        created=datetime(2026, 1, 1, tzinfo=UTC),
        input_shape=INPUT_SHAPE,
        latent_dim=manifest_latent,
        likelihood="bernoulli",
        architecture="tiny linear test VAE",
        dataset="none",
        files=ModelFiles(
            encoder=FileEntry(path=ENCODER_FILE, sha256=sha256_file(directory / ENCODER_FILE)),
            decoder=FileEntry(path=DECODER_FILE, sha256=sha256_file(directory / DECODER_FILE)),
        ),
        metrics=Metrics(
            test_elbo=-500.0,
            test_nll=490.0,
            iwae_k=1,
            bits_per_dim=0.9,
            active_units=4,
            recon_error=0.2,
            test_images=1,
        ),
        export_check=ExportCheck(encoder_max_abs_diff=0.0, decoder_max_abs_diff=0.0, tolerance=1e-5),
        training=TrainingRecord(command="conftest", config={}, epochs=0, seconds=0.0, device="cpu"),
        libraries={"onnx": onnx.__version__},
    )
    write_manifest(directory, manifest)
    return directory


def rewrite_checksums(directory: Path) -> None:
    """Make the manifest match the ONNX files as they are now (after a test swapped one)."""
    manifest = read_manifest(directory)
    files = ModelFiles(
        encoder=FileEntry(path=ENCODER_FILE, sha256=sha256_file(directory / ENCODER_FILE)),
        decoder=FileEntry(path=DECODER_FILE, sha256=sha256_file(directory / DECODER_FILE)),
    )
    write_manifest(directory, manifest.model_copy(update={"files": files}))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MODEL_DIR with tiny/2 and tiny/10, different weights."""
    root = tmp_path_factory.mktemp("models")
    for seed, version in enumerate(VERSIONS):
        write_model(root, MODEL, version, seed)
    return root


def make_settings(model_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "model_dir": model_dir,
        "device": "cpu",
        "intra_op_threads": 1,
        "max_batch": 16,
        "max_samples": 2048,
        "max_queue_rows": 4096,
        "max_batch_rows": 64,
        "batch_window_ms": 2.0,
        **overrides,
    }
    return Settings(_env_file=None, **values)


@asynccontextmanager
async def serve(model_dir: Path, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An app with its lifespan running (ASGITransport does not run it) and a client talking to it."""
    app = create_app(make_settings(model_dir, **overrides))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        yield client


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def client(model_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(model_dir) as c:
        yield c


def image_batch(n: int, seed: int = 0) -> np.ndarray:
    """n images [n, 1, 28, 28] with values k / 255 (exact in float32, like 8-bit pixels)."""
    return (np.random.default_rng(seed).integers(0, 256, (n, *INPUT_SHAPE)) / 255).astype(np.float32)


def eps_for(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """eps exactly as the service draws it (operations module docstring)."""
    return np.random.Generator(np.random.PCG64(seed)).standard_normal(shape, dtype=np.float32)


def f32(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)
