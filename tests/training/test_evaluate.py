"""Test-set figures: the validation ELBO statistics training selects its best epoch by."""

from __future__ import annotations

import pytest
import torch

from tests.training.conftest import small_vae
from training.evaluate import elbo_stats
from training.objectives import negative_elbo


def test_elbo_stats_reports_the_mean_and_the_median_of_per_image_elbos() -> None:
    model = small_vae().eval()
    x = torch.rand(7, 1, 28, 28, dtype=torch.float64)
    x[3] = 1.0  # an odd image far worse than the rest: it moves the mean, not the median
    stats = elbo_stats(model, x, seed=5)
    terms = negative_elbo(model, x, generator=torch.Generator().manual_seed(5))
    per_image = -(terms.recon + terms.kl).double()
    assert stats["elbo"] == pytest.approx(per_image.mean().item(), rel=1e-5)
    assert stats["median_elbo"] == pytest.approx(per_image.median().item(), rel=1e-5)
    assert stats["median_elbo"] > stats["elbo"]
