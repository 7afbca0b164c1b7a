"""Fixtures for the service tests: a tiny stand-in VAE (bench/standin.py, no torch), apps and httpx clients.

The tiny model has the real contract (x [batch, 1, 28, 28] -> mu, logvar [batch, 4]; z [batch, 4] ->
x_mean [batch, 1, 28, 28]) with a dynamic batch axis and no hidden layer, so every route runs end to end
in milliseconds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from bench import standin
from service.app import create_app
from service.settings import Settings

INPUT_SHAPE = standin.IMAGE_SHAPE
PIXELS = standin.PIXELS
LATENT = 4
MODEL = "tiny"
VERSIONS = ("2", "10")  # numeric ordering: 10 is the newest, though "10" < "2" as strings
NEWEST = "10"


def write_model(root: Path, name: str, version: str, seed: int, *, manifest_latent: int = LATENT) -> Path:
    """A tiny model directory root/name/version with a manifest carrying the real checksums."""
    return standin.write_model(
        root, name, version, seed=seed, hidden=(), latent=LATENT, manifest_latent=manifest_latent
    )


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
        "parse_workers": 0,  # a process pool per app would cost a spawn per test; test_parse_pool covers it
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
