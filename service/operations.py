"""The VAE operations (encode, sample, reconstruct, decode) on numpy arrays: no HTTP, no onnxruntime.

Randomness is passed in: each operation takes the request's `np.random.Generator` and draws all of its eps
in ONE call, before any graph runs, so a request's eps depends only on (seed, shapes) and never on which
other requests share its batch. With `rng = np.random.Generator(np.random.PCG64(seed))` and L = latent_dim:

    encode       eps = rng.standard_normal((batch, samples, L), dtype=np.float32)   (only when samples > 0)
                 z[b, s] = mu[b] + sigma[b] * eps[b, s]
    sample       eps = rng.standard_normal((n, L), dtype=np.float32)
                 z = np.float32(temperature) * eps
    reconstruct  mode "sample": eps = rng.standard_normal((batch, L), dtype=np.float32); z = mu + sigma * eps
                 mode "mean":   no draw; z = mu
    score        eps = rng.standard_normal((batch, k, L), dtype=np.float32); z = mu + sigma * eps, then, with
                 a background model of latent size Lb, rng.standard_normal((batch, k, Lb), dtype=np.float32)
                 for it the same way (two calls, both before any graph runs)
    interpolate  no draw

with sigma = exp(logvar / 2), all in float32. A client holding the seed reproduces eps exactly with those
lines, and z exactly from the returned mu and sigma.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

from service import scoring
from service.manifest import Manifest

F32 = npt.NDArray[np.float32]
ReconstructMode = Literal["mean", "sample"]

SEED_BITS = 53
"""Drawn seeds stay below 2**53 so they survive a round trip through a JavaScript number."""


class VAE(Protocol):
    """What the operations need from a model: its two graphs, batched or not."""

    @property
    def latent_dim(self) -> int: ...

    async def run_encoder(self, x: F32) -> tuple[F32, F32]:
        """x [batch, *input_shape] -> mu, logvar [batch, latent_dim]."""
        ...

    async def run_decoder(self, z: F32) -> F32:
        """z [batch, latent_dim] -> x_mean [batch, *input_shape]."""
        ...


def draw_seed() -> int:
    """A fresh seed from OS entropy, returned to the client so the request can be replayed."""
    return secrets.randbits(SEED_BITS)


def seed_or_draw(requested: int | None) -> int:
    """The client's seed, or a fresh one (`draw_seed`) when it sent none."""
    return draw_seed() if requested is None else requested


def make_rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def sigma_of(logvar: F32) -> F32:
    # sigma = exp(logvar / 2): the standard deviation of the diagonal Gaussian q(z|x).
    sigma: F32 = np.exp(logvar * np.float32(0.5))
    return sigma


@dataclass(frozen=True)
class Encoding:
    mu: F32  # [batch, L]
    logvar: F32  # [batch, L]
    sigma: F32  # [batch, L]
    z: F32 | None  # [batch, samples, L], None when samples == 0


@dataclass(frozen=True)
class Reconstruction:
    images: F32  # [batch, *input_shape]
    z: F32  # [batch, L]: the latents that were decoded
    error: F32  # [batch]: mean squared error per image


@dataclass(frozen=True)
class Samples:
    images: F32  # [n, *input_shape]
    z: F32  # [n, L]


async def encode(model: VAE, x: F32, samples: int, rng: np.random.Generator) -> Encoding:
    eps = rng.standard_normal((x.shape[0], samples, model.latent_dim), dtype=np.float32) if samples else None
    mu, logvar = await model.run_encoder(x)
    sigma = sigma_of(logvar)
    # Reparameterisation: z = mu + sigma * eps, broadcast over the samples axis -> [batch, samples, L].
    z = mu[:, None, :] + sigma[:, None, :] * eps if eps is not None else None
    return Encoding(mu=mu, logvar=logvar, sigma=sigma, z=z)


async def sample(model: VAE, n: int, temperature: float, rng: np.random.Generator) -> Samples:
    # z ~ N(0, temperature^2 I): the prior, scaled.
    z = np.float32(temperature) * rng.standard_normal((n, model.latent_dim), dtype=np.float32)
    return Samples(images=await model.run_decoder(z), z=z)


async def reconstruct(
    model: VAE, x: F32, mode: ReconstructMode, rng: np.random.Generator | None
) -> Reconstruction:
    """`rng` is needed by mode sample only: mode mean draws nothing, so it has no seed to report."""
    eps = None
    if mode == "sample":
        if rng is None:
            raise ValueError("reconstruct mode sample needs a generator")
        eps = rng.standard_normal((x.shape[0], model.latent_dim), dtype=np.float32)
    mu, logvar = await model.run_encoder(x)
    z = mu if eps is None else mu + sigma_of(logvar) * eps
    images = await model.run_decoder(z)
    # Per-image MSE over all pixels: the same figure as the manifest's metrics.recon_error.
    error: F32 = np.square(images - x).reshape(x.shape[0], -1).mean(axis=1, dtype=np.float32)
    return Reconstruction(images=images, z=z, error=error)


async def decode(model: VAE, z: F32) -> F32:
    return await model.run_decoder(z)


def likelihood_of(manifest: Manifest) -> tuple[scoring.Likelihood, float]:
    """The model's likelihood and, for a Gaussian one, its fixed standard deviation (training config)."""
    std = manifest.training.config.get("gaussian_std", 0.1)
    return manifest.likelihood, float(std) if isinstance(std, int | float) else 0.1


@dataclass(frozen=True)
class Score:
    bounds: scoring.Bounds  # the model's elbo, iwae, kl, recon_error per image
    anomaly: scoring.F64 | None  # the anomaly score per image; None without a background model


async def _bounds(
    model: VAE, x: F32, eps: F32, likelihood: scoring.Likelihood, gaussian_std: float
) -> scoring.Bounds:
    batch, k, latent = eps.shape
    mu, logvar = await model.run_encoder(x)
    z = mu[:, None, :] + sigma_of(logvar)[:, None, :] * eps  # [batch, k, L]
    # decode(mu) for recon_error and the k draws, as two submissions: each stays within the request limits
    x_mean_mu, x_mean = await asyncio.gather(
        model.run_decoder(mu), model.run_decoder(z.reshape(batch * k, latent))
    )
    flat = x.reshape(batch, -1)
    return await asyncio.to_thread(  # a few ms of numpy per 1,000 rows: off the event loop
        scoring.bounds,
        flat,
        mu,
        logvar,
        eps,
        z,
        x_mean.reshape(batch, k, -1),
        x_mean_mu.reshape(batch, -1),
        likelihood,
        gaussian_std,
    )


async def score(
    model: VAE,
    x: F32,
    k: int,
    rng: np.random.Generator,
    likelihood: scoring.Likelihood,
    gaussian_std: float = 0.1,
    background: VAE | None = None,
) -> Score:
    """Likelihood bounds of each image with k importance samples and, given a background model, the anomaly
    score (`service.scoring`). The two models run concurrently, each on its own batchers."""
    batch = x.shape[0]
    eps = rng.standard_normal((batch, k, model.latent_dim), dtype=np.float32)
    if background is None:
        return Score(await _bounds(model, x, eps, likelihood, gaussian_std), None)
    eps_background = rng.standard_normal((batch, k, background.latent_dim), dtype=np.float32)
    bounds, background_bounds = await asyncio.gather(
        _bounds(model, x, eps, likelihood, gaussian_std),
        _bounds(background, x, eps_background, likelihood, gaussian_std),
    )
    return Score(bounds, scoring.anomaly_score(bounds, background_bounds))


@dataclass(frozen=True)
class Interpolation:
    images: F32  # [steps, *input_shape]
    z: F32  # [steps, L]
    t: F32  # [steps]: 0 at the first endpoint, 1 at the last


async def interpolate(
    model: VAE, ends: F32, steps: int, method: scoring.Method, *, latent: bool
) -> Interpolation:
    """Decode `steps` points between two endpoints: ends [2, L] latents (`latent`), or [2, *input_shape]
    images, which stand for their posterior means. The first and last points decode exactly the endpoints."""
    if not latent:
        ends, _ = await model.run_encoder(ends)
    t, z = scoring.interpolate(ends[0], ends[1], steps, method)
    return Interpolation(images=await model.run_decoder(z), z=z, t=t)
