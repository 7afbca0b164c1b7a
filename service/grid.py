"""Images as 8-bit pixels and as one tiled picture (numpy only).

Shared by the service's PNG responses and training's figures, so that a grid of samples looks the same
whichever side drew it. Images are float arrays in [0, 1]; pixels are round(x * 255), clipped.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

Pixels = npt.NDArray[np.uint8]


def as_uint8(images: npt.NDArray[np.floating]) -> Pixels:
    """round(x * 255), clipped to 0-255 (round half to even)."""
    pixels: Pixels = np.rint(np.clip(images, 0.0, 1.0) * np.float32(255)).astype(np.uint8)
    return pixels


def channels_last(pixels: Pixels) -> Pixels:
    """[n, H, W], [n, 1, H, W] or [n, 3, H, W] -> [n, H, W] or [n, H, W, 3]; ValueError for other shapes."""
    if pixels.ndim == 4 and pixels.shape[1] == 1:
        return pixels[:, 0]
    if pixels.ndim == 4 and pixels.shape[1] == 3:
        return pixels.transpose(0, 2, 3, 1)
    if pixels.ndim == 3:
        return pixels
    raise ValueError(f"images of shape {list(pixels.shape[1:])} cannot be drawn")


def tile(pixels: Pixels, cols: int = 0, pad: int = 2, fill: int = 128, border: bool = False) -> Pixels:
    """Lay [n, H, W] or [n, H, W, C] pixels out row by row, `cols` wide (0: a near-square grid).

    Cells are `pad` pixels apart in colour `fill`; with `border`, the same margin runs around the outside.
    """
    n, height, width = pixels.shape[:3]
    channels = pixels.shape[3:]
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    # Each cell is an image plus padding on its right and bottom; the last row and column lose it below.
    cells = np.full((rows * cols, height + pad, width + pad, *channels), fill, dtype=np.uint8)
    cells[:n, :height, :width] = pixels
    grid = cells.reshape(rows, cols, height + pad, width + pad, *channels).swapaxes(1, 2)
    grid = grid.reshape(rows * (height + pad), cols * (width + pad), *channels)
    if pad:
        grid = grid[:-pad, :-pad]
    if border:
        margin = [(pad, pad), (pad, pad)] + [(0, 0)] * len(channels)
        grid = np.pad(grid, margin, constant_values=fill)
    return np.ascontiguousarray(grid)
