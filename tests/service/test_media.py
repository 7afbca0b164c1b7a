"""Content types: negotiation between what a client accepts and what an operation can answer; PNG grids."""

from __future__ import annotations

import numpy as np
import pytest

from service.errors import NotAcceptable
from service.media import JSON, NPY, PNG, negotiate
from service.responses import GRID_PADDING, png_grid

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("accept", "offered", "chosen"),
    [
        (None, (JSON, NPY, PNG), JSON),
        ("", (JSON, NPY), JSON),
        ("*/*", (JSON, NPY, PNG), JSON),
        ("image/png", (JSON, NPY, PNG), PNG),
        ("application/*", (JSON, NPY, PNG), JSON),
        ("application/x-npy, application/json;q=0.5", (JSON, NPY), NPY),
        ("application/json;q=0.2, image/png", (JSON, NPY, PNG), PNG),
        ("text/html, */*;q=0.1", (JSON, NPY), JSON),
        ("image/*;q=0.9, application/json;q=0.8", (JSON, NPY, PNG), PNG),
        ("IMAGE/PNG", (JSON, PNG), PNG),
        ("image/png, */*", (JSON, NPY, PNG), PNG),
        ("image/png;q=0, */*", (JSON, PNG), JSON),
        ("application/json;q=0, */*;q=0.5", (JSON, NPY), NPY),
    ],
    ids=[
        "absent",
        "empty",
        "any",
        "png",
        "application-wildcard",
        "q-prefers-npy",
        "q-prefers-png",
        "fallback-any",
        "image-wildcard",
        "case-insensitive",
        "exact-beats-wildcard",
        "explicit-exclusion",
        "excluded-json",
    ],
)
def test_negotiate(accept: str | None, offered: tuple[str, ...], chosen: str) -> None:
    assert negotiate(accept, offered) == chosen


@pytest.mark.parametrize("accept", ["text/html", "image/png;q=0", "application/xml, text/*", "*/*;q=0"])
def test_negotiate_refuses(accept: str) -> None:
    with pytest.raises(NotAcceptable):
        negotiate(accept, (JSON, NPY))


def test_png_grid_layout_for_rgb() -> None:
    images = np.zeros((3, 3, 4, 5), dtype=np.float32)
    images[:, 0] = 1.0  # red
    grid, rows, cols = png_grid(images)
    assert (rows, cols) == (2, 2)
    assert grid.shape == (2 * 4 + GRID_PADDING, 2 * 5 + GRID_PADDING, 3)
    np.testing.assert_array_equal(grid[0, 0], [255, 0, 0])
