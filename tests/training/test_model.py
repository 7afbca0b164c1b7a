"""The model: the reparameterization, the posterior's KL, the logvar clamp, the shapes of both architectures."""

from __future__ import annotations

import math

import pytest
import torch

from tests.training.conftest import small_vae
from training.config import TrainConfig
from training.model import LOGVAR_MAX, LOGVAR_MIN, VAE, DiagonalGaussian, clamp_logvar, reparameterize


@pytest.mark.parametrize(
    ("mu", "sigma"), [(0.0, 1.0), (1.5, 0.5), (-2.0, 3.0)], ids=["std", "narrow", "wide"]
)
def test_reparameterized_gradient_of_z_squared_matches_exact(mu: float, sigma: float) -> None:
    """E[z^2] = mu^2 + sigma^2 for z ~ N(mu, sigma^2): d/dmu = 2 mu, d/dsigma = 2 sigma.

    Each of the n samples gets its own leaf copy of (mu, logvar), so autograd hands back n per-sample
    gradients whose mean is the Monte Carlo estimate and whose spread gives its standard error.
    """
    n = 20_000
    gen = torch.Generator().manual_seed(0)
    mu_t = torch.full((n,), mu, dtype=torch.float64, requires_grad=True)
    logvar_t = torch.full((n,), 2 * math.log(sigma), dtype=torch.float64, requires_grad=True)
    eps = torch.randn(n, generator=gen, dtype=torch.float64)
    reparameterize(mu_t, logvar_t, eps).pow(2).sum().backward()
    grad_mu = mu_t.grad
    grad_sigma = logvar_t.grad * 2 / sigma  # dz/dlogvar = sigma/2 * eps, so d/dsigma = d/dlogvar * 2/sigma
    for grads, exact in ((grad_mu, 2 * mu), (grad_sigma, 2 * sigma)):
        stderr = grads.std().item() / math.sqrt(n)
        assert abs(grads.mean().item() - exact) < 4 * stderr, (grads.mean().item(), exact, stderr)


def test_reparameterize_uses_the_given_eps() -> None:
    mu, logvar, eps = (
        torch.tensor([1.0, -1.0]),
        torch.log(torch.tensor([4.0, 0.25])),
        torch.tensor([0.5, 2.0]),
    )
    assert torch.allclose(reparameterize(mu, logvar, eps), torch.tensor([1.0 + 2.0 * 0.5, -1.0 + 0.5 * 2.0]))


def test_kl_is_zero_for_the_prior() -> None:
    q = DiagonalGaussian(torch.zeros(3, 4), torch.zeros(3, 4))
    assert torch.allclose(q.kl(), torch.zeros(3))


def test_logvar_is_clamped_so_the_kl_stays_finite() -> None:
    model = small_vae()
    with torch.no_grad():
        model.to_stats.bias[4:] = 1e4  # the logvar half of the output
    q = model.encode(torch.rand(2, 1, 28, 28, dtype=torch.float64))
    assert q.logvar.max().item() == LOGVAR_MAX
    assert torch.isfinite(q.kl()).all()


def test_logvar_clamp_passes_the_gradient_through() -> None:
    raw = torch.tensor([-50.0, 0.0, 50.0], requires_grad=True)
    clamped = clamp_logvar(raw)
    assert clamped.tolist() == [LOGVAR_MIN, 0.0, LOGVAR_MAX]
    clamped.sum().backward()
    assert raw.grad is not None and raw.grad.tolist() == [1.0, 1.0, 1.0]  # a clamped unit can still recover


def test_the_logvar_ceiling_keeps_sigma_within_e_of_the_prior() -> None:
    # an encoder extrapolating on an odd image must not hand the decoder (or a client) a huge sigma
    assert LOGVAR_MAX == 2.0
    model = small_vae()
    with torch.no_grad():
        model.to_stats.bias[4:] = 11.0  # sigma 245 unclamped
    q = model.encode(torch.rand(2, 1, 28, 28, dtype=torch.float64))
    assert torch.exp(0.5 * q.logvar).max().item() == pytest.approx(math.e)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_shapes(arch: str) -> None:
    model = VAE(TrainConfig(arch=arch, hidden=(48,), channels=(4, 8), latent_dim=6))  # type: ignore[arg-type]
    x = torch.rand(5, 1, 28, 28)
    q = model.encode(x)
    assert q.mu.shape == q.logvar.shape == (5, 6)
    out, _, z = model(x, torch.randn(3, 5, 6))
    assert out.shape == (3, 5, 1, 28, 28) and z.shape == (3, 5, 6)
    assert model.decode_mean(torch.randn(7, 6)).shape == (7, 1, 28, 28)
