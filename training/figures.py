"""The pictures an export ships beside the graphs: samples.png, reconstructions.png and curves.png.

Image grids are laid out by `service.grid`, the helper the service draws its PNG responses with, so a grid
of samples looks the same whichever side drew it. Curves are drawn by matplotlib's Agg backend (no display).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from service.grid import as_uint8, channels_last, tile
from training.model import VAE

COLS = 16  # tiles per row
SCALE = 3  # each pixel drawn as a 3x3 block: 28-pixel tiles are small on a screen


def grid_image(images: np.ndarray, cols: int = COLS) -> Image.Image:
    """[N, 1, H, W] in [0, 1] -> one greyscale picture, `cols` tiles a row, 2 white pixels around each."""
    pixels = tile(channels_last(as_uint8(images)), cols, pad=2, fill=255, border=True)
    height, width = pixels.shape
    return Image.fromarray(pixels).resize((width * SCALE, height * SCALE), Image.Resampling.NEAREST)


@torch.inference_mode()
def save_samples(model: VAE, path: Path, rows: int = 8, seed: int = 0) -> None:
    """Decoder means for `rows` x 16 latents drawn from the prior N(0, I)."""
    z = torch.randn(rows * COLS, model.latent_dim, generator=torch.Generator().manual_seed(seed))
    grid_image(model.decode_mean(z).numpy()).save(path)


@torch.inference_mode()
def save_reconstructions(model: VAE, images: torch.Tensor, path: Path) -> None:
    """Up to 4 rows of test images, each row over its reconstructions decode(mu) (fewer for few images)."""
    cols = min(COLS, len(images))
    x = images[: min(4, len(images) // cols) * cols]  # [rows * cols, 1, 28, 28]
    recon = model.decode_mean(model.encode(x).mu)
    pairs = [torch.stack([x[i : i + cols], recon[i : i + cols]]) for i in range(0, len(x), cols)]
    grid_image(torch.cat(pairs).flatten(0, 1).numpy(), cols).save(path)  # [rows, 2, cols, ...] -> tiles


def save_curves(history: list[dict[str, float]], path: Path) -> None:
    """Train and validation ELBO per epoch, zoomed on the range where late epochs differ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    epochs = [row["epoch"] for row in history]
    ax.plot(epochs, [row["train_elbo"] for row in history], label="train ELBO")
    ax.plot(epochs, [row["val_elbo"] for row in history], label="validation ELBO")
    finite = [v for row in history for v in (row["train_elbo"], row["val_elbo"]) if math.isfinite(v)]
    if finite:  # the first epochs dwarf the rest; show the part where the models differ
        top = max(finite)
        ax.set_ylim(top - 3 * (top - sorted(finite)[len(finite) // 2]) - 5, top + 2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO (nats per image)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_figures(
    model: VAE, test_images: torch.Tensor, history: list[dict[str, float]], out_dir: Path
) -> None:
    """samples.png, reconstructions.png and curves.png in out_dir."""
    model.eval()
    save_samples(model, out_dir / "samples.png")
    save_reconstructions(model, test_images, out_dir / "reconstructions.png")
    save_curves(history, out_dir / "curves.png")
