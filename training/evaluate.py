"""Honest test-set figures for a trained VAE: ELBO, the IWAE bound on log p(x), bits/dim, active units, MSE.

    python -m training evaluate runs/default/best.pt --iwae-k 1000

The IWAE estimate uses k importance samples per image (Burda et al. 2016); it is a lower bound on log p(x)
that tightens as k grows, so the NLL it reports is an upper bound on the true NLL. With the Bernoulli decoder
on grey-level pixels (the default: Fashion-MNIST is not binarized) "log p(x|z)" is the per-pixel binary
cross-entropy, the field's usual convention there, so the figures are bounds on that cross-entropy rather
than on a density over grey levels; it cannot go below the images' own binary entropy. With k = 1000 over 10k
images that is 10M decoder passes: images are processed a few at a time (k samples each) so memory stays
bounded, under `torch.inference_mode`, with a progress bar.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from training.model import VAE
from training.objectives import iwae_bound, iwae_log_weights, negative_elbo

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016: a unit is active if Cov_x(E_q[z_u]) > 0.01


@dataclass(frozen=True)
class EvalResult:
    """Means over the images, in nats per image unless named otherwise (elbo is negative, nll positive)."""

    elbo: float
    recon: float
    kl: float
    nll: float
    iwae_k: int
    bits_per_dim: float
    active_units: int
    recon_error: float
    images: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@torch.inference_mode()
def elbo_stats(model: VAE, x: torch.Tensor, batch_size: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean ELBO (beta = 1, analytic KL, one z per image) with its recon and KL parts, and the median ELBO.

    The median is what training selects its best checkpoint by: one image unlike any in training can move
    the mean by nats from one epoch to the next (see LOGVAR_MAX), far more than a late epoch improves it.
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    recon, kl = [], []
    for start in range(0, len(x), batch_size):
        terms = negative_elbo(model, x[start : start + batch_size], generator=gen)
        recon.append(terms.recon)
        kl.append(terms.kl)
    model.train(was_training)
    recon_all, kl_all = torch.cat(recon).double(), torch.cat(kl).double()
    return {
        "elbo": -(recon_all + kl_all).mean().item(),
        "median_elbo": -(recon_all + kl_all).median().item(),
        "recon": recon_all.mean().item(),
        "kl": kl_all.mean().item(),
    }


@torch.inference_mode()
def iwae_log_likelihood(
    model: VAE,
    x: torch.Tensor,
    k: int,
    seed: int = 0,
    rows_per_pass: int = 16384,
    progress: bool = False,
) -> torch.Tensor:
    """Per-image IWAE lower bound on log p(x) with k samples: x [N, ...] -> [N] (float64).

    `rows_per_pass` caps k * images per decoder pass (16384 rows ~ 50 MB of pixels at float32).
    """
    model.eval()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    per_pass = max(1, rows_per_pass // k)
    out = torch.empty(len(x), dtype=torch.float64)
    with tqdm(total=len(x), desc=f"IWAE k={k}", unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(x), per_pass):
            chunk = x[start : start + per_pass]
            out[start : start + len(chunk)] = (
                iwae_bound(iwae_log_weights(model, chunk, k, gen)).double().cpu()
            )
            bar.update(len(chunk))
    return out


@torch.inference_mode()
def latent_stats(model: VAE, x: torch.Tensor, batch_size: int = 1000) -> tuple[int, float]:
    """(active units, mean squared error of decode_mean(mu) against x per pixel)."""
    model.eval()
    mus, sq_err = [], 0.0
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size]
        mu = model.encode(xb).mu
        mus.append(mu)
        sq_err += (model.decode_mean(mu) - xb).pow(2).sum().item()
    mu_all = torch.cat(mus)  # [N, D]
    active = int((mu_all.var(dim=0) > ACTIVE_UNIT_THRESHOLD).sum().item())
    return active, sq_err / x.numel()


def evaluate(model: VAE, x: torch.Tensor, k: int, seed: int = 0, progress: bool = False) -> EvalResult:
    """All the test figures of the issue on images x [N, 1, 28, 28]."""
    elbo = elbo_stats(model, x, seed=seed)
    nll = -iwae_log_likelihood(model, x, k, seed=seed, progress=progress).mean().item()
    active, mse = latent_stats(model, x)
    pixels = math.prod(x.shape[1:])
    return EvalResult(
        elbo=elbo["elbo"],
        recon=elbo["recon"],
        kl=elbo["kl"],
        nll=nll,
        iwae_k=k,
        bits_per_dim=nll / (pixels * math.log(2)),
        active_units=active,
        recon_error=mse,
        images=len(x),
    )
