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

with sigma = exp(logvar / 2), all in float32. A client holding the seed reproduces eps exactly with those
lines, and z exactly from the returned mu and sigma.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

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
