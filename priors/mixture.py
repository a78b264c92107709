"""A mixture of K diagonal Gaussians with learned weights, means and log variances."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from priors.base import Prior
from priors.densities import DiagonalGaussianMixture


class MixturePrior(Prior):
    """p(z) = sum_k pi_k N(z; mu_k, diag(exp(logvar_k))), every piece learned.

    The weights are a softmax of learned logits, so they stay on the simplex without
    constraints. The log density is a logsumexp over the K components of log pi_k plus the
    component's full log density (the -1/2 log 2 pi terms kept), as torch's
    `MixtureSameFamily` computes it, through `priors.densities.DiagonalGaussianMixture`
    (matrix products in float64).

    Initialization: logits 0 (equal weights), means N(0, init_std^2), log variances 0.

    Args:
        latent_dim: size D of the latent space.
        num_components: K, the number of components (> 0).
        init_std: standard deviation of the random initial means.

    References:
        Dilokthanakul et al., "Deep Unsupervised Clustering with Gaussian Mixture
        Variational Autoencoders", 2016; Tomczak & Welling, "VAE with a VampPrior", 2018
        (the mixture-of-Gaussians baseline).
    """

    def __init__(self, latent_dim: int, num_components: int = 500, init_std: float = 1.0) -> None:
        super().__init__(latent_dim)
        if int(num_components) != num_components or num_components <= 0:
            raise ValueError(f"MixturePrior: num_components (K) must be a positive integer, got {num_components!r}")
        self.num_components = int(num_components)
        self.logits = nn.Parameter(torch.zeros(self.num_components))
        self.means = nn.Parameter(init_std * torch.randn(self.num_components, self.latent_dim))
        self.logvars = nn.Parameter(torch.zeros(self.num_components, self.latent_dim))

    def mixture(self) -> DiagonalGaussianMixture:
        return DiagonalGaussianMixture(self.means, self.logvars, torch.log_softmax(self.logits, dim=-1))

    def _log_prob(self, z: Tensor) -> Tensor:
        return self.mixture().log_prob(z)

    def _sample(self, n: int) -> Tensor:
        return self.mixture().sample(n)

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, num_components={self.num_components}"
