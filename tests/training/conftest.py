"""Fixtures for the training tests: synthetic IDX files, the real data directory, tiny configs."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from training.config import TrainConfig
from training.data import DEBIAN_DIR, FILES, IMAGE_FILES, LABEL_FILES
from training.model import VAE


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped IDX file (magic 0x0000080N, big-endian dims)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def small_vae(**overrides: Any) -> VAE:
    """A seeded float64 MLP VAE, 784-64-4, for checks against theory; keyword arguments override config fields."""
    torch.manual_seed(0)
    return VAE(TrainConfig(hidden=(64,), latent_dim=4, **overrides)).double()


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory in the real layout: 600 train and 200 test images of blurry bars, with labels."""
    directory = tmp_path_factory.mktemp("synthetic-idx")
    rng = np.random.default_rng(0)
    for split, n in (("train", 600), ("test", 200)):
        labels = rng.integers(0, 10, n)
        images = np.zeros((n, 28, 28), dtype=np.float32)
        for i, label in enumerate(labels):  # a bar whose position encodes the label, plus noise
            images[i, :, 2 + 2 * label : 6 + 2 * label] = 1.0
        images = np.clip(images * 230 + rng.normal(0, 20, images.shape), 0, 255)
        write_idx(directory / IMAGE_FILES[split], images)
        write_idx(directory / LABEL_FILES[split], labels)
    return directory


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """The Debian Fashion-MNIST files, which CI installs; tests that need them skip without them."""
    if not all((DEBIAN_DIR / name).is_file() for name in FILES):
        pytest.skip(f"Fashion-MNIST not installed at {DEBIAN_DIR} (apt-get install dataset-fashion-mnist)")
    return DEBIAN_DIR


@pytest.fixture
def tiny_config(tmp_path: Path, synthetic_dir: Path) -> Callable[..., TrainConfig]:
    """A factory of small, fast configs on the synthetic data; keyword arguments override fields."""

    def make(**overrides: Any) -> TrainConfig:
        values: dict[str, Any] = {
            "data_dir": str(synthetic_dir),
            "val_size": 100,
            "hidden": (32,),
            "latent_dim": 4,
            "batch_size": 50,
            "batch_start": 0,
            "epochs": 2,
            "lr": 3e-3,
            "out": str(tmp_path / "run"),
            "progress": False,
            "iwae_k": 4,
            "threads": 1,
        }
        values.update(overrides)
        return TrainConfig(**values)

    return make


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Tests share 2 cores with each other's processes; one intra-op thread keeps them predictable."""
    torch.set_num_threads(1)
