"""The estimators: reparameterization gradients, KL, ELBO and IWAE, checked against what theory says."""

from __future__ import annotations

import math

import pytest
import torch

from training.config import TrainConfig
from training.evaluate import elbo_stats
from training.model import LOGVAR_MAX, LOGVAR_MIN, VAE, DiagonalGaussian, clamp_logvar, reparameterize
from training.objectives import (
    bernoulli_nll,
    gaussian_nll,
    iwae_bound,
    iwae_log_weights,
    kl_monte_carlo,
    negative_elbo,
)


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


def test_analytic_and_monte_carlo_kl_agree_within_error() -> None:
    gen = torch.Generator().manual_seed(1)
    mu = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    logvar = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    q = DiagonalGaussian(mu, logvar)
    s = 50_000
    z = q.sample(torch.randn(s, 8, 5, generator=gen, dtype=torch.float64))  # [S, 8, 5]
    mc = kl_monte_carlo(q, z)  # [S, 8]
    stderr = mc.std(0) / math.sqrt(s)
    assert torch.all((mc.mean(0) - q.kl()).abs() < 4 * stderr)
    assert torch.all(q.kl() > 0)


def test_kl_is_zero_for_the_prior() -> None:
    q = DiagonalGaussian(torch.zeros(3, 4), torch.zeros(3, 4))
    assert torch.allclose(q.kl(), torch.zeros(3))


def test_likelihoods_match_torch_distributions() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 1, 28, 28, generator=gen)
    x = torch.rand(4, 1, 28, 28, generator=gen).round()  # binary x: Bernoulli's own log-prob applies
    expected = -torch.distributions.Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(bernoulli_nll(logits, x), expected, atol=1e-3)
    grey = torch.rand(4, 1, 28, 28, generator=gen)  # the grey-level pixels training uses: cross-entropy
    expected = (
        -torch.distributions.Bernoulli(logits=logits, validate_args=False).log_prob(grey).flatten(1).sum(1)
    )
    assert torch.allclose(bernoulli_nll(logits, grey), expected, atol=1e-3)
    mean = torch.rand(4, 1, 28, 28, generator=gen)
    expected = -torch.distributions.Normal(mean, 0.1).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(gaussian_nll(mean, x, 0.1), expected, rtol=1e-5)


def _small_vae(**overrides: object) -> VAE:
    torch.manual_seed(0)
    return VAE(TrainConfig(hidden=(64,), latent_dim=4, **overrides)).double()  # type: ignore[arg-type]


def test_iwae_bound_is_above_the_elbo_and_grows_with_k() -> None:
    model = _small_vae().eval()
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        elbo = -negative_elbo(model, x, samples=2000, generator=gen).loss.mean().item()
        bounds = {k: iwae_bound(iwae_log_weights(model, x, k, gen)).mean().item() for k in (1, 10, 100, 1000)}
    assert abs(bounds[1] - elbo) < 0.02 * abs(elbo)  # k = 1 is a one-sample ELBO
    assert elbo < bounds[10] < bounds[100] < bounds[1000]


def test_iwae_bound_equals_log_p_x_where_it_is_known_exactly() -> None:
    """With q(z|x) = p(z) (zero encoder head) and p(x|z) = p(x) (decoder blind to z) every weight w_i is p(x),
    so the bound is log p(x) for every k: this pins the - log k and the signs of all three terms."""
    model = _small_vae().eval()
    with torch.no_grad():
        model.to_stats.weight.zero_()
        model.to_stats.bias.zero_()
        first = next(m for m in model.decoder.modules() if isinstance(m, torch.nn.Linear))
        first.weight.zero_()
        x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        log_px = -bernoulli_nll(model.decode(torch.zeros(8, 4, dtype=torch.float64)), x)
        gen = torch.Generator().manual_seed(6)
        for k in (1, 10, 100):
            log_w = iwae_log_weights(model, x, k, gen)
            assert log_w.shape == (k, 8)
            assert torch.allclose(iwae_bound(log_w), log_px, atol=1e-9, rtol=0), k


def test_beta_weights_only_the_kl() -> None:
    model = _small_vae()
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    terms = negative_elbo(model, x, beta=0.25, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(terms.loss, terms.recon + 0.25 * terms.kl)


def test_gaussian_likelihood_trains_and_decodes_into_the_pixel_range() -> None:
    model = _small_vae(likelihood="gaussian")
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    terms = negative_elbo(model, x, generator=torch.Generator().manual_seed(0))
    terms.loss.mean().backward()
    assert torch.isfinite(terms.loss).all()
    mean = model.decode_mean(torch.randn(64, 4, dtype=torch.float64) * 10)
    assert mean.min() >= 0 and mean.max() <= 1


def test_logvar_is_clamped_so_the_kl_stays_finite() -> None:
    model = _small_vae()
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
    model = _small_vae()
    with torch.no_grad():
        model.to_stats.bias[4:] = 11.0  # sigma 245 unclamped
    q = model.encode(torch.rand(2, 1, 28, 28, dtype=torch.float64))
    assert torch.exp(0.5 * q.logvar).max().item() == pytest.approx(math.e)


def test_elbo_stats_reports_the_mean_and_the_median_of_per_image_elbos() -> None:
    model = _small_vae().eval()
    x = torch.rand(7, 1, 28, 28, dtype=torch.float64)
    x[3] = 1.0  # an odd image far worse than the rest: it moves the mean, not the median
    stats = elbo_stats(model, x, seed=5)
    terms = negative_elbo(model, x, generator=torch.Generator().manual_seed(5))
    per_image = -(terms.recon + terms.kl).double()
    assert stats["elbo"] == pytest.approx(per_image.mean().item(), rel=1e-5)
    assert stats["median_elbo"] == pytest.approx(per_image.median().item(), rel=1e-5)
    assert stats["median_elbo"] > stats["elbo"]


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_shapes(arch: str) -> None:
    model = VAE(TrainConfig(arch=arch, hidden=(48,), channels=(4, 8), latent_dim=6))  # type: ignore[arg-type]
    x = torch.rand(5, 1, 28, 28)
    q = model.encode(x)
    assert q.mu.shape == q.logvar.shape == (5, 6)
    out, _, z = model(x, torch.randn(3, 5, 6))
    assert out.shape == (3, 5, 1, 28, 28) and z.shape == (3, 5, 6)
    assert model.decode_mean(torch.randn(7, 6)).shape == (7, 1, 28, 28)
