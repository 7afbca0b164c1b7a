"""The VAE objectives, per example and in nats: reconstruction NLL, KL, negative ELBO, IWAE log-weights.

    -ELBO(x) = E_q[-log p(x|z)] + beta * KL(q(z|x) || N(0, I))           (beta = 1: the true bound)
    IWAE_k(x) = log (1/k) sum_i p(x, z_i) / q(z_i|x),  z_i ~ q(z|x)       (Burda et al. 2016; <= log p(x))

Training can maximise either (`training_terms`); the IWAE gradient can be the plain one or the doubly
reparameterized one (DReG, Tucker et al. 2019), whose encoder gradient keeps its signal as k grows.

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


def log_importance_weights(
    recon: torch.Tensor, q: DiagonalGaussian, z: torch.Tensor, beta: float = 1.0
) -> torch.Tensor:
    """log w = log p(x|z) + beta * (log p(z) - log q(z|x)) per sample, from recon = -log p(x|z) [k, B].

    z [k, B, D] -> [k, B]. beta = 1 gives the importance weights of the IWAE bound; beta < 1 (KL warm-up)
    tempers the prior and posterior terms as the ELBO's KL weight does.
    """
    return -recon + beta * (standard_normal_log_prob(z) - q.log_prob(z))


def iwae_terms(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    k: int,
    beta: float = 1.0,
    dreg: bool = False,
    generator: torch.Generator | None = None,
) -> ElboTerms:
    """-IWAE_k per example as `loss`, with the k samples' mean recon NLL and MC KL as `recon` and `kl`.

    The gradient of `loss` is the IWAE gradient, -sum_i w~_i grad log w_i with w~ = softmax(log w) over the
    k samples (Burda et al. 2016). With `dreg`, the encoder's part is the doubly reparameterized
    estimator instead (Tucker et al. 2019): -sum_i w~_i^2 (d log w_i / d z_i) (d z_i / d phi), with
    q's parameters held fixed inside log q(z_i|x) so that only the path through z_i carries a gradient.
    Its expectation is the same; its variance does not swamp the signal as k grows. The decoder's part is
    unchanged. Done here by scaling the gradient reaching each z_i by w~_i (a hook), the surrogate weighting
    every log w_i by w~_i: the decoder sees w~_i, the encoder w~_i^2. `loss` holds the bound's value either
    way. DReG's identity holds for the true weights (beta = 1); during a KL warm-up (beta < 1) its encoder
    gradient is the same formula on the tempered weights, a heuristic for the first few percent of training.
    """
    vae: VAE = getattr(model, "module", model)
    eps = torch.randn((k, x.shape[0], vae.latent_dim), generator=generator, device=x.device, dtype=x.dtype)
    out, q, z = model(x, eps)  # out [k, B, 1, 28, 28], z [k, B, D]
    recon = reconstruction_nll(vae, out, x)  # [k, B]
    # with DReG, log q is taken with q's parameters fixed: the encoder's gradient flows through z alone
    q_w = DiagonalGaussian(q.mu.detach(), q.logvar.detach()) if dreg else q
    log_w = log_importance_weights(recon, q_w, z, beta)  # [k, B]
    bound = iwae_bound(log_w)  # [B]
    if dreg and torch.is_grad_enabled() and z.requires_grad:
        w = torch.softmax(log_w.detach(), dim=0)  # [k, B], normalised importance weights
        z.register_hook(lambda grad: grad * w.unsqueeze(-1))
        surrogate = (w * log_w).sum(0)  # same gradient for the decoder as the bound's
        loss = -(bound.detach() + surrogate - surrogate.detach())
    else:
        loss = -bound
    kl_mc = (q.log_prob(z) - standard_normal_log_prob(z)).detach()  # reported, not trained on
    return ElboTerms(loss, recon.mean(0).detach(), kl_mc.mean(0))


def training_terms(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    objective: str = "elbo",
    samples: int = 1,
    kl: str = "analytic",
    beta: float = 1.0,
    generator: torch.Generator | None = None,
) -> ElboTerms:
    """The training objective's per-example terms: `loss` is what the step minimises."""
    if objective == "elbo":
        return negative_elbo(model, x, samples=samples, kl=kl, beta=beta, generator=generator)
    if objective in ("iwae", "iwae-dreg"):
        return iwae_terms(model, x, k=samples, beta=beta, dreg=objective == "iwae-dreg", generator=generator)
    raise ValueError(f"unknown objective {objective!r}")


def iwae_log_weights(
    model: VAE, x: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x) for k samples per image: x [B, ...] -> [k, B]."""
    q = model.encode(x)
    eps = torch.randn((k, *q.mu.shape), generator=generator, device=x.device, dtype=q.mu.dtype)
    z = q.sample(eps)  # [k, B, D]
    return log_importance_weights(reconstruction_nll(model, model.decode(z), x), q, z)


def iwae_bound(log_weights: torch.Tensor) -> torch.Tensor:
    """log (1/k) sum_i w_i over the sample dim: [k, B] -> [B]; k = 1 gives a one-sample ELBO."""
    return torch.logsumexp(log_weights, dim=0) - math.log(log_weights.shape[0])
