"""The objectives: likelihoods, Monte Carlo KL, the ELBO's beta, the IWAE bound and its training gradients
(plain and DReG), checked against theory, quadrature and sample-by-sample computations."""

from __future__ import annotations

import math

import pytest
import torch

from tests.training.conftest import small_vae
from training.config import TrainConfig
from training.model import VAE, DiagonalGaussian, standard_normal_log_prob
from training.objectives import (
    bernoulli_nll,
    gaussian_nll,
    iwae_bound,
    iwae_log_weights,
    kl_monte_carlo,
    negative_elbo,
    training_terms,
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


def _one_dimensional_vae() -> VAE:
    """A seeded float64 VAE with one latent dimension, whose log p(x) quadrature can compute exactly."""
    torch.manual_seed(0)
    return VAE(TrainConfig(hidden=(16,), latent_dim=1)).double().eval()


def _log_p_x_by_quadrature(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """log p(x) = log of the integral of p(x|z) N(z; 0, 1) over z on a fine grid (the rest is below 1e-30)."""
    z = torch.linspace(-12.0, 12.0, 4801, dtype=torch.float64)[:, None]  # [G, 1]
    logits = model.decode(z).unsqueeze(1).expand(-1, len(x), -1, -1, -1)  # [G, B, 1, 28, 28]
    log_joint = -bernoulli_nll(logits, x) + standard_normal_log_prob(z).unsqueeze(1)  # [G, B]
    return torch.logsumexp(log_joint, 0) + math.log(z[1, 0] - z[0, 0])


def test_iwae_bound_converges_to_log_p_x_computed_by_quadrature() -> None:
    """On binary images, where log p(x) is a true log-probability: the ELBO lies below it, and the IWAE bound
    closes the gap as k grows, to within a few hundredths of a nat at k = 2000."""
    model = _one_dimensional_vae()
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(3), dtype=torch.float64).round()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        log_px = _log_p_x_by_quadrature(model, x)
        elbo = -negative_elbo(model, x, samples=2000, generator=gen).loss
        gaps = {k: (log_px - iwae_bound(iwae_log_weights(model, x, k, gen))).abs().max() for k in (10, 2000)}
    assert torch.all(elbo < log_px - 0.1), (elbo, log_px)
    assert gaps[2000] < 0.1 and gaps[2000] < gaps[10], gaps


def _sample_by_sample_iwae(model: VAE, x: torch.Tensor, eps: torch.Tensor, beta: float) -> torch.Tensor:
    """The tempered IWAE bound written out one sample at a time with torch.distributions: [B]."""
    q = model.encode(x)
    std = torch.exp(0.5 * q.logvar)
    log_w = []
    for e in eps:  # [B, D] each
        z = q.mu + std * e
        log_px_z = torch.distributions.Bernoulli(logits=model.decode(z)).log_prob(x).flatten(1).sum(1)
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
        log_qz = torch.distributions.Normal(q.mu, std).log_prob(z).sum(1)
        log_w.append(log_px_z + beta * (log_pz - log_qz))
    return torch.logsumexp(torch.stack(log_w), 0) - math.log(len(eps))


@pytest.mark.parametrize("objective", ["iwae", "iwae-dreg"])
@pytest.mark.parametrize("beta", [1.0, 0.3], ids=["beta 1", "beta 0.3"])
def test_iwae_training_loss_is_minus_the_bound_written_out(objective: str, beta: float) -> None:
    model = small_vae()
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(7), dtype=torch.float64).round()
    terms = training_terms(
        model, x, objective=objective, samples=6, beta=beta, generator=torch.Generator().manual_seed(8)
    )
    eps = torch.randn((6, 3, 4), generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    expected = _sample_by_sample_iwae(model, x, eps, beta)
    assert torch.allclose(-terms.loss, expected, atol=1e-9, rtol=0)
    # the reported terms are the k samples' mean reconstruction NLL and Monte Carlo KL: a k-sample ELBO
    q = model.encode(x)
    z = q.sample(eps)
    assert torch.allclose(terms.recon, bernoulli_nll(model.decode(z), x).mean(0))
    assert torch.allclose(terms.kl, kl_monte_carlo(q, z).mean(0))


def _gradients(model: torch.nn.Module, objective: str, x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    model.zero_grad()
    terms = training_terms(
        model, x, objective=objective, samples=5, generator=torch.Generator().manual_seed(seed)
    )
    terms.loss.sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_dreg_leaves_the_decoder_gradient_as_it_is() -> None:
    """DReG changes only the encoder's estimator: with the same noise, the decoder's gradient is IWAE's."""
    model = small_vae()
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    plain, dreg = (_gradients(model, objective, x, seed=10) for objective in ("iwae", "iwae-dreg"))
    decoder = [name for name in plain if name.startswith("decoder.")]
    assert decoder and all(torch.allclose(plain[n], dreg[n], atol=1e-10, rtol=1e-8) for n in decoder)
    assert not torch.allclose(plain["to_stats.weight"], dreg["to_stats.weight"])


class RowPosteriors(torch.nn.Module):
    """A VAE whose q(z|x) is one free (mu, logvar) per row: each row's gradient is one draw of an estimator."""

    likelihood = "bernoulli"

    def __init__(self, rows: int, latent_dim: int) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.latent_dim = latent_dim
        self.mu = torch.nn.Parameter(
            0.5 * torch.randn(1, latent_dim, dtype=torch.float64).expand(rows, -1).clone()
        )
        self.logvar = torch.nn.Parameter(torch.full((rows, latent_dim), -1.0, dtype=torch.float64))
        self.decoder = torch.nn.Linear(latent_dim, 784).double()

    def forward(
        self, x: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, DiagonalGaussian, torch.Tensor]:
        q = DiagonalGaussian(self.mu, self.logvar)
        z = q.sample(eps)
        return self.decoder(z).unflatten(-1, (1, 28, 28)), q, z


def test_dreg_and_iwae_encoder_gradients_agree_in_expectation() -> None:
    """Both estimate the gradient of E[IWAE_5] with respect to q's parameters: over 4,000 independent draws
    (one image repeated, each row its own mu and logvar) their means agree within 4 standard errors of the
    difference, and DReG's spread is the smaller one."""
    rows = 4000
    model = RowPosteriors(rows, latent_dim=2)
    x = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(12), dtype=torch.float64).round()
    x = x.expand(rows, -1, -1, -1)
    plain, dreg = (_gradients(model, objective, x, seed=13) for objective in ("iwae", "iwae-dreg"))
    for name in ("mu", "logvar"):
        diff = plain[name] - dreg[name]  # [rows, 2]: same noise, so the difference has the smaller spread
        stderr = diff.std(0) / math.sqrt(rows)
        assert torch.all((diff.mean(0)).abs() < 4 * stderr), (name, diff.mean(0), stderr)
        assert torch.all(dreg[name].std(0) < plain[name].std(0)), name
