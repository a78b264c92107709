"""A mixture of K diagonal Gaussians with learned weights, means and log variances."""

from __future__ import annotations


import torch
from torch import Tensor, nn

from priors.base import Prior
from priors.densities import diagonal_normal_log_prob


class MixturePrior(Prior):
    """p(z) = sum_k pi_k N(z; mu_k, diag(exp(logvar_k))), every piece learned.

    The weights are a softmax of learned logits, so they stay on the simplex without
    constraints. The log density is a logsumexp over the K components of log pi_k plus the
    component's full log density (the -1/2 log 2 pi terms kept), as torch's
    `MixtureSameFamily` computes it. With K = 500 and a batch of 100 the `[B, K, D]`
    broadcast is small, so it is computed directly.

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
        # The means come from their own generator, seeded from the global stream: drawn
        # straight from the global stream after `torch.manual_seed(s)`, they would equal the
        # first noise draws of any later evaluation seeded with the same s (the trainer's
        # `evaluate` seeds with the run's seed), putting evaluation samples on the means.
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        means = init_std * torch.randn(self.num_components, self.latent_dim, generator=generator)
        self.means = nn.Parameter(means)
        self.logvars = nn.Parameter(torch.zeros(self.num_components, self.latent_dim))

    def _log_prob(self, z: Tensor) -> Tensor:
        log_weights = torch.log_softmax(self.logits, dim=-1)  # [K]
        component = diagonal_normal_log_prob(z.unsqueeze(-2), self.means, self.logvars)  # [..., K]
        return torch.logsumexp(component + log_weights, dim=-1)

    def _sample(self, n: int) -> Tensor:
        if n == 0:  # torch's categorical sampler refuses zero draws
            return self.means.new_zeros(0, self.latent_dim)
        k = torch.distributions.Categorical(logits=self.logits.detach()).sample((n,))
        eps = torch.randn(n, self.latent_dim, device=self.means.device, dtype=self.means.dtype)
        return self.means[k] + torch.exp(0.5 * self.logvars[k]) * eps

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, num_components={self.num_components}"
