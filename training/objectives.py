"""The VAE objectives, per example and in nats: reconstruction NLL, KL, negative ELBO, IWAE log-weights.

    -ELBO(x) = E_q[-log p(x|z)] + beta * KL(q(z|x) || N(0, I))           (beta = 1: the true bound)
    IWAE_k(x) = log (1/k) sum_i p(x, z_i) / q(z_i|x),  z_i ~ q(z|x)       (Burda et al. 2016; <= log p(x))

Every function takes its noise as a `torch.Generator` so results are reproducible and callers decide where
randomness comes from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.model import VAE, DiagonalGaussian, standard_normal_log_prob


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log Bernoulli(x; sigmoid(logits)) summed over pixels; x may be any intensity in [0, 1].

    logits [..., 1, 28, 28], x broadcastable to it -> [...].
    """
    x = x.expand_as(logits)
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(-3).sum(-1)


def gaussian_nll(mean: torch.Tensor, x: torch.Tensor, std: float) -> torch.Tensor:
    """-log N(x; mean, std^2 I) summed over pixels: mean [..., 1, 28, 28] -> [...]."""
    per_pixel = 0.5 * ((x - mean) / std).pow(2) + math.log(std) + 0.5 * math.log(2 * math.pi)
    return per_pixel.flatten(-3).sum(-1)


def reconstruction_nll(model: VAE, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) for the model's likelihood, given its decoder output `out`."""
    if model.likelihood == "bernoulli":
        return bernoulli_nll(out, x)
    return gaussian_nll(out, x, model.gaussian_std)


def kl_monte_carlo(q: DiagonalGaussian, z: torch.Tensor) -> torch.Tensor:
    """Single-sample KL estimate log q(z|x) - log p(z) per sample (SGVB estimator A's KL term)."""
    return q.log_prob(z) - standard_normal_log_prob(z)


@dataclass(frozen=True)
class ElboTerms:
    """Per-example terms [B]: `loss` = recon + beta * kl is what training minimises."""

    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor


def negative_elbo(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    samples: int = 1,
    kl: str = "analytic",
    beta: float = 1.0,
    generator: torch.Generator | None = None,
) -> ElboTerms:
    """-ELBO per example with L = `samples` draws of z; `kl` is "analytic" (estimator B) or "mc" (A).

    `model` is a VAE or a DistributedDataParallel wrapping one (called through its forward either way).
    """
    vae: VAE = getattr(model, "module", model)
    eps = torch.randn(
        (samples, x.shape[0], vae.latent_dim), generator=generator, device=x.device, dtype=x.dtype
    )  # [L, B, D]
    out, q, z = model(x, eps)
    recon = reconstruction_nll(vae, out, x).mean(0)  # [L, B] -> [B]
    if kl == "analytic":
        kl_term = q.kl()
    elif kl == "mc":
        kl_term = kl_monte_carlo(q, z).mean(0)
    else:
        raise ValueError(f"unknown KL estimator {kl!r}")
    return ElboTerms(recon + beta * kl_term, recon, kl_term)


def iwae_log_weights(
    model: VAE, x: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x) for k samples per image: x [B, ...] -> [k, B]."""
    q = model.encode(x)
    eps = torch.randn((k, *q.mu.shape), generator=generator, device=x.device, dtype=q.mu.dtype)
    z = q.sample(eps)  # [k, B, D]
    log_px_z = -reconstruction_nll(model, model.decode(z), x)  # [k, B]
    return log_px_z + standard_normal_log_prob(z) - q.log_prob(z)


def iwae_bound(log_weights: torch.Tensor) -> torch.Tensor:
    """log (1/k) sum_i w_i over the sample dim: [k, B] -> [B]; k = 1 gives a one-sample ELBO."""
    return torch.logsumexp(log_weights, dim=0) - math.log(log_weights.shape[0])
