"""Paired comparison: each checkpoint's figures on the same images, and the difference to the first."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from training.checkpoints import BEST, LAST, load_checkpoint
from training.compare import compare
from training.config import TrainConfig
from training.data import binarize_fixed, load_split
from training.evaluate import elbo_stats, iwae_log_likelihood
from training.train import train


@pytest.mark.parametrize("binarized", [False, True], ids=["grey", "binarized"])
def test_compare_scores_every_checkpoint_on_the_same_images(
    tiny_config: Callable[..., TrainConfig], synthetic_dir: Path, binarized: bool
) -> None:
    out = train(tiny_config(epochs=2, binarize_seed=3)).out_dir
    rows = compare([out / BEST, out / BEST, out / LAST], k=4, images=50, binarized=binarized)
    x = load_split(synthetic_dir, "test")
    if binarized:
        x = binarize_fixed(x, 3)
    model, _ = load_checkpoint(out / BEST)
    assert rows[0]["nll"] == pytest.approx(-iwae_log_likelihood(model, x[:50], 4).mean().item(), rel=1e-6)
    assert rows[0]["test_elbo"] == pytest.approx(elbo_stats(model, x)["elbo"], rel=1e-6)
    assert rows[0]["nll_images"] == 50 and "nll_minus_first" not in rows[0]
    assert rows[1]["nll_minus_first"] == 0.0 and rows[1]["nll_minus_first_se"] == 0.0  # the same model
    assert rows[2]["nll_minus_first"] == pytest.approx(rows[2]["nll"] - rows[0]["nll"])
