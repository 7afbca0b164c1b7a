"""The maths of `score` and `interpolate` on numpy arrays: likelihood bounds, the anomaly score, latent paths.

No HTTP, no onnxruntime, no torch: the service calls these on its graphs' outputs, and training calls the
very same functions on the same graphs' outputs when it measures the AUROCs and the threshold it records in
the manifest, so the figures there describe exactly the score the service computes.

Likelihood bounds, per image x with D pixels and L latent units, for k draws z_i = mu + sigma * eps_i:

    log w_i = log p(x | z_i) + log N(z_i; 0, I) - log q(z_i | x)
    iwae    = log (1/k) sum_i w_i                        (Burda et al. 2016; a lower bound on log p(x))
    elbo    = (1/k) sum_i log p(x | z_i) - KL(q || N(0, I)), the KL in closed form
              (Kingma & Welling 2014, appendix B: -1/2 sum(1 + logvar - mu^2 - exp(logvar)))

with log q(z_i | x) = -1/2 sum(log 2 pi + logvar + eps_i^2), exact because (z_i - mu) / sigma = eps_i. The
decoder serves pixel means p = sigmoid(logits), so the Bernoulli log-likelihood is computed from them:
sum x log p + (1 - x) log (1 - p), with p clipped to [2^-126, 1 - 2^-24], the range where float32 still tells
p from 0 and from 1 (a mean that rounded to exactly 1.0 would otherwise cost an infinite amount on a grey
pixel). The Gaussian likelihood uses the training run's fixed standard deviation.

Anomaly score: the log-likelihood ratio of a background model to the model, in nats,

    score = elbo_background(x) - elbo_model(x)

(Ren et al. 2019, "Likelihood ratios for out-of-distribution detection"). The background model is a VAE of
the same family trained on noise-perturbed training images (`training.background`): it explains an image's
low-level statistics (how many pixels are dark, how smooth it is) about as well as the model does, but not
what the model learned about the training images' content. The ratio cancels what both explain, so a high
score means the model explains the image no better than a model of perturbed pixels: unlike its training
data. Raw likelihood is not used: this model gives MNIST digits a *higher* likelihood than its own test
images (Nalisnick et al. 2019). ELBOs rather than IWAE bounds, because the ELBO's expectation does not depend
on k, so the threshold recorded in the manifest holds for any k a request asks for (more k, less noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Likelihood = Literal["bernoulli", "gaussian"]
Method = Literal["linear", "slerp"]

P_MIN = np.float32(2.0**-126)  # the smallest normal float32
P_MAX = np.float32(1.0 - 2.0**-24)  # the largest float32 below 1
LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class Bounds:
    """Per-image figures [batch], in nats (elbo and iwae are log-likelihood bounds: higher is more typical)."""

    elbo: F64
    iwae: F64
    kl: F64
    recon_error: F64  # mean squared error of decode(mu) against the image, over all pixels


def log_likelihood(x: F32, x_mean: F32, likelihood: Likelihood, gaussian_std: float = 0.1) -> F64:
    """log p(x | z) summed over pixels: x [batch, D], x_mean [batch, k, D] -> [batch, k] (float64)."""
    x = x[:, None, :]
    if likelihood == "bernoulli":
        p = np.clip(x_mean, P_MIN, P_MAX)
        per_pixel = x * np.log(p) + (np.float32(1.0) - x) * np.log1p(-p)
    else:
        std = np.float32(gaussian_std)
        per_pixel = np.float32(-0.5) * np.square((x - x_mean) / std) - np.float32(
            math.log(gaussian_std) + 0.5 * LOG_2PI
        )
    total: F64 = per_pixel.sum(axis=-1, dtype=np.float64)
    return total


def kl_divergence(mu: F32, logvar: F32) -> F64:
    """KL(N(mu, exp(logvar)) || N(0, I)) per row in closed form: [batch, L] -> [batch]."""
    mu64, logvar64 = mu.astype(np.float64), logvar.astype(np.float64)
    kl: F64 = 0.5 * np.sum(np.square(mu64) + np.exp(logvar64) - 1.0 - logvar64, axis=-1)
    return kl


def log_mean_exp(values: F64, axis: int = -1) -> F64:
    """log (1/k) sum exp(values) along `axis`, without overflow."""
    top = np.max(values, axis=axis, keepdims=True)
    out: F64 = np.squeeze(top, axis=axis) + np.log(np.mean(np.exp(values - top), axis=axis))
    return out


def bounds(
    x: F32,
    mu: F32,
    logvar: F32,
    eps: F32,
    z: F32,
    x_mean: F32,
    x_mean_mu: F32,
    likelihood: Likelihood,
    gaussian_std: float = 0.1,
) -> Bounds:
    """The bounds of each image from the graphs' outputs.

    x [batch, D]; mu, logvar [batch, L]; eps, z [batch, k, L] with z = mu + sigma * eps; x_mean [batch, k, D]
    the decoded z; x_mean_mu [batch, D] the decoded mu.
    """
    log_px = log_likelihood(x, x_mean, likelihood, gaussian_std)  # [batch, k]
    z64, eps64 = z.astype(np.float64), eps.astype(np.float64)
    log_pz = -0.5 * np.sum(LOG_2PI + np.square(z64), axis=-1)  # [batch, k]
    log_qz = -0.5 * np.sum(LOG_2PI + logvar.astype(np.float64)[:, None, :] + np.square(eps64), axis=-1)
    kl = kl_divergence(mu, logvar)
    error: F64 = np.mean(np.square(x_mean_mu - x), axis=-1, dtype=np.float64)
    return Bounds(
        elbo=log_px.mean(axis=1) - kl,
        iwae=log_mean_exp(log_px + log_pz - log_qz, axis=1),
        kl=kl,
        recon_error=error,
    )


def anomaly_score(model: Bounds, background: Bounds) -> F64:
    """log p_background(x) - log p_model(x), estimated by the ELBOs: high means unlike the training data."""
    score: F64 = background.elbo - model.elbo
    return score


def interpolate(a: F32, b: F32, steps: int, method: Method) -> tuple[F32, F32]:
    """`steps` points from latent a to latent b [L], both included exactly: (t [steps], z [steps, L]).

    linear: (1 - t) a + t b. slerp (Shoemake 1985, for latents White 2016): along the great circle through a
    and b, sin((1 - t) w) / sin w a + sin(t w) / sin w b with cos w = a.b / (|a| |b|), which keeps the norm
    of Gaussian draws typical where the straight line would pass close to the origin; when a or b is 0, or
    they are (anti)parallel (sin w ~ 0), it falls back to linear.
    """
    t64 = np.linspace(0.0, 1.0, steps)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    path = (1.0 - t64)[:, None] * a64 + t64[:, None] * b64
    if method == "slerp":
        norms = float(np.linalg.norm(a64)) * float(np.linalg.norm(b64))
        if norms > 0.0:
            omega = math.acos(min(1.0, max(-1.0, float(a64 @ b64) / norms)))
            if math.sin(omega) > 1e-6:
                path = (np.sin((1.0 - t64) * omega)[:, None] * a64 + np.sin(t64 * omega)[:, None] * b64) / (
                    math.sin(omega)
                )
    z = path.astype(np.float32)
    z[0], z[-1] = a, b  # exact endpoints, whatever the rounding above
    return t64.astype(np.float32), z
