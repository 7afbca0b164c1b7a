"""The exported pictures: the layout of the grids, which rows hold what, curves without a validation set."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.grid import as_uint8
from training.config import TrainConfig
from training.figures import COLS, SCALE, grid_image, save_figures
from training.model import VAE


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def _tile(picture: np.ndarray, row: int, col: int) -> np.ndarray:
    """The 28x28 tile at (row, col) of a grid picture, at one pixel per pixel (2-pixel gutters and border)."""
    top, left = 2 + row * 30, 2 + col * 30
    return picture[top * SCALE : (top + 28) * SCALE : SCALE, left * SCALE : (left + 28) * SCALE : SCALE]


def test_grid_lays_tiles_out_row_by_row_between_white_gutters() -> None:
    images = np.stack([np.full((1, 28, 28), v, dtype=np.float32) for v in (0.0, 0.5, 1.0)])
    picture = np.asarray(grid_image(images, cols=2))
    assert picture.shape == ((2 * 30 + 2) * SCALE, (2 * 30 + 2) * SCALE)
    assert [_tile(picture, r, c).max() for r, c in ((0, 0), (0, 1), (1, 0))] == [0, 128, 255]
    assert (_tile(picture, 1, 1) == 255).all()  # the empty fourth cell
    assert (picture[: 2 * SCALE] == 255).all() and (picture[:, 30 * SCALE : 32 * SCALE] == 255).all()


@pytest.fixture(scope="module")
def model() -> VAE:
    torch.manual_seed(0)
    return VAE(TrainConfig(hidden=(16,), latent_dim=4)).eval()


def test_reconstructions_put_each_row_of_test_images_over_its_reconstructions(
    model: VAE, tmp_path: Path
) -> None:
    x = torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(1))  # 2 full rows of 16, 8 left out
    save_figures(model, x, [{"epoch": 1, "train_elbo": -300.0, "val_elbo": -310.0}], tmp_path)
    picture = _pixels(tmp_path / "reconstructions.png")
    assert picture.shape == ((4 * 30 + 2) * SCALE, (COLS * 30 + 2) * SCALE)
    with torch.no_grad():
        recon = model.decode_mean(model.encode(x).mu).numpy()
    for row, col in ((0, 0), (1, 15)):
        image = row * COLS + col
        assert np.array_equal(_tile(picture, 2 * row, col), as_uint8(x[image, 0].numpy()))
        assert np.array_equal(_tile(picture, 2 * row + 1, col), as_uint8(recon[image, 0]))
    samples = _pixels(tmp_path / "samples.png")
    assert samples.shape == ((8 * 30 + 2) * SCALE, (COLS * 30 + 2) * SCALE)


def test_fewer_test_images_than_a_row_and_no_validation_set(model: VAE, tmp_path: Path) -> None:
    history = [{"epoch": e, "train_elbo": -300.0 + e, "val_elbo": math.nan} for e in (1, 2, 3)]
    save_figures(model, torch.rand(5, 1, 28, 28), history, tmp_path)
    picture = _pixels(tmp_path / "reconstructions.png")
    assert picture.shape == ((2 * 30 + 2) * SCALE, (5 * 30 + 2) * SCALE)  # one row of 5 over its 5
    assert _pixels(tmp_path / "curves.png").shape[:2] == (480, 720)  # 6 x 4 inches at 120 dpi
