"""The isotropic Gaussian prior p(z) = N(0, I)."""

from __future__ import annotations

import torch
from torch import Tensor

from priors.base import Prior
from priors.densities import LOG_2PI, diagonal_normal_kl, diagonal_normal_log_prob, reparameterize


class GaussianPrior(Prior):
    """Standard normal prior N(0, I) with an analytic KL for diagonal-Gaussian posteriors.

    It has no parameters; the zero mean and log variance are buffers so they follow the
    module's device and dtype.

    Args:
        latent_dim: size D of the latent space.

    References:
        Kingma & Welling, "Auto-Encoding Variational Bayes", 2014.
    """

    has_analytic_kl = True
    is_factorized = True

    def __init__(self, latent_dim: int) -> None:
        super().__init__(latent_dim)
        self.register_buffer("mean", torch.zeros(self.latent_dim))
        self.register_buffer("logvar", torch.zeros(self.latent_dim))

    def _log_prob(self, z: Tensor) -> Tensor:
        return diagonal_normal_log_prob(z, self.mean, self.logvar)

    def _log_prob_per_dim(self, z: Tensor) -> Tensor:
        return -0.5 * (LOG_2PI + self.logvar + (z - self.mean).square() * torch.exp(-self.logvar))

    def _sample(self, n: int) -> Tensor:
        return reparameterize(self.mean.expand(n, -1), self.logvar)

    def _kl(self, mu: Tensor, logvar: Tensor) -> Tensor:
        return diagonal_normal_kl(mu, logvar, self.mean, self.logvar)
