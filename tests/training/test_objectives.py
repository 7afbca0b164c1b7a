"""The objectives: likelihoods, Monte Carlo KL, the ELBO's beta and the IWAE bound, checked against theory."""

from __future__ import annotations

import math

import torch

from tests.training.conftest import small_vae
from training.model import DiagonalGaussian
from training.objectives import (
    bernoulli_nll,
    gaussian_nll,
    iwae_bound,
    iwae_log_weights,
    kl_monte_carlo,
    negative_elbo,
)


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


def test_iwae_bound_is_above_the_elbo_and_grows_with_k() -> None:
    model = small_vae().eval()
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
    model = small_vae().eval()
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
    model = small_vae()
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    terms = negative_elbo(model, x, beta=0.25, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(terms.loss, terms.recon + 0.25 * terms.kl)


def test_gaussian_likelihood_trains_and_decodes_into_the_pixel_range() -> None:
    model = small_vae(likelihood="gaussian")
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    terms = negative_elbo(model, x, generator=torch.Generator().manual_seed(0))
    terms.loss.mean().backward()
    assert torch.isfinite(terms.loss).all()
    mean = model.decode_mean(torch.randn(64, 4, dtype=torch.float64) * 10)
    assert mean.min() >= 0 and mean.max() <= 1
