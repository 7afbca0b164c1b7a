"""The VAE: an encoder to a diagonal Gaussian q(z|x), the reparameterization, and a decoder to p(x|z).

    x [B, 1, 28, 28] --encoder--> mu, logvar [B, D] --reparameterize--> z [B, D] --decoder--> logits/mean

Two architectures share that interface: an MLP (default) and a small conv net. The decoder returns the
likelihood's parameter (Bernoulli logits, or the Gaussian mean); `decode_mean` gives pixel means in [0, 1],
which is what the exported decoder serves.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from training.config import TrainConfig

# logvar is clamped to this range before anything exponentiates it. The floor keeps exp(logvar) away from 0
# (sigma >= 3e-7). The ceiling is low on purpose: a posterior wider than the N(0, I) prior (logvar > 0) only
# adds KL, so a working encoder keeps logvar at or below about 0 on real images. On an image unlike any in
# training, though, an MLP encoder extrapolates to a huge sigma, and the z it then draws, far outside the
# prior, decodes at a cost large enough to swamp the mean validation ELBO. Capping sigma at e (logvar 2)
# bounds that damage in training and in the exported encoder alike, so clients sampling from (mu, logvar)
# get the same bound.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 2.0


def clamp_logvar(logvar: torch.Tensor) -> torch.Tensor:
    """Clamp the value but pass the gradient straight through.

    A plain clamp has zero gradient outside the range: after one bad optimizer step an example whose logvar
    lands above the ceiling stays there, its KL term stuck, because nothing pulls it back. With the
    straight-through gradient the KL term pushes it back down at once.
    """
    clamped = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
    if not logvar.requires_grad:  # inference and export: a plain clamp
        return clamped
    return clamped.detach() + (logvar - logvar.detach())  # value: exactly `clamped`; gradient: identity


_ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
}


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + exp(0.5 * logvar) * eps, eps ~ N(0, I) (Kingma & Welling 2014, eq. 10).

    Sampling z this way makes it a differentiable function of (mu, logvar), so the gradient of E_q[f(z)]
    flows through the sample; eps is an argument so that tests and callers control the randomness.
    """
    return mu + torch.exp(0.5 * logvar) * eps


class DiagonalGaussian:
    """q(z|x) = N(mu, diag(exp(logvar))), with the few operations the objectives need."""

    def __init__(self, mu: torch.Tensor, logvar: torch.Tensor) -> None:
        self.mu = mu
        self.logvar = logvar

    def sample(
        self, eps: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One reparameterized sample per row, or per leading slice of `eps` if it has extra dims [S, B, D]."""
        if eps is None:
            eps = torch.randn(self.mu.shape, generator=generator, device=self.mu.device, dtype=self.mu.dtype)
        return reparameterize(self.mu, self.logvar, eps)

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per row in closed form: -1/2 sum(1 + logvar - mu^2 - exp(logvar)).

        Kingma & Welling 2014, appendix B; this is what makes their SGVB estimator B lower-variance than A.
        """
        return -0.5 * torch.sum(1.0 + self.logvar - self.mu.pow(2) - self.logvar.exp(), dim=-1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z|x) summed over latent dims; z may carry leading sample dims [S, B, D]."""
        return -0.5 * torch.sum(
            math.log(2 * math.pi) + self.logvar + (z - self.mu).pow(2) / self.logvar.exp(), dim=-1
        )


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dim."""
    return -0.5 * torch.sum(math.log(2 * math.pi) + z.pow(2), dim=-1)


def _mlp(sizes: list[int], activation: type[nn.Module]) -> nn.Sequential:
    """Linear layers with `activation` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """Encoder and decoder for 1x28x28 images, MLP or conv, with a Bernoulli or Gaussian decoder."""

    input_shape = (1, 28, 28)

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.arch = cfg.arch
        self.latent_dim = cfg.latent_dim
        self.likelihood = cfg.likelihood
        self.gaussian_std = cfg.gaussian_std
        act = _ACTIVATIONS[cfg.activation]
        n_pixels = math.prod(self.input_shape)
        d = cfg.latent_dim
        if cfg.arch == "mlp":
            h = list(cfg.hidden)
            self.encoder = nn.Sequential(nn.Flatten(), _mlp([n_pixels, *h], act), act())
            self.to_stats = nn.Linear(h[-1], 2 * d)
            self.decoder = nn.Sequential(
                _mlp([d, *reversed(h), n_pixels], act), nn.Unflatten(1, self.input_shape)
            )
        else:
            c1, c2 = cfg.channels
            h = cfg.hidden[0]
            self.encoder = nn.Sequential(
                nn.Conv2d(1, c1, 4, stride=2, padding=1),  # [B, 1, 28, 28] -> [B, c1, 14, 14]
                act(),
                nn.Conv2d(c1, c2, 4, stride=2, padding=1),  # -> [B, c2, 7, 7]
                act(),
                nn.Flatten(),  # -> [B, c2 * 49]
                nn.Linear(c2 * 49, h),
                act(),
            )
            self.to_stats = nn.Linear(h, 2 * d)
            self.decoder = nn.Sequential(
                nn.Linear(d, h),
                act(),
                nn.Linear(h, c2 * 49),
                act(),
                nn.Unflatten(1, (c2, 7, 7)),
                nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1),  # -> [B, c1, 14, 14]
                act(),
                nn.ConvTranspose2d(c1, 1, 4, stride=2, padding=1),  # -> [B, 1, 28, 28]
            )

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x [B, 1, 28, 28] in [0, 1] -> q(z|x) with mu, logvar [B, D]."""
        mu, logvar = self.to_stats(self.encoder(x)).chunk(2, dim=-1)
        return DiagonalGaussian(mu, clamp_logvar(logvar))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., D] -> the likelihood's parameter [..., 1, 28, 28] (logits or mean); leading dims kept."""
        lead = z.shape[:-1]
        out = self.decoder(z.reshape(-1, self.latent_dim))  # [prod(lead), 1, 28, 28]
        return out.reshape(*lead, *self.input_shape)

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel means in [0, 1]: sigmoid of the logits, or the Gaussian mean clamped to the pixel range."""
        out = self.decode(z)
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out.clamp(0.0, 1.0)

    def forward(
        self, x: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, DiagonalGaussian, torch.Tensor]:
        """x [B, 1, 28, 28], eps [L, B, D] -> (decoder output [L, B, 1, 28, 28], q(z|x), z [L, B, D]).

        The training step goes through `forward` (not `encode`/`decode` separately) so that a
        DistributedDataParallel wrapper sees the call and synchronises the gradients.
        """
        q = self.encode(x)
        z = q.sample(eps)
        return self.decode(z), q, z
