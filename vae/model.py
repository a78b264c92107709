"""The VAE: an MLP encoder to a diagonal Gaussian q(z|x), an MLP decoder to Bernoulli logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from priors.base import Prior
from priors.densities import diagonal_normal_log_prob


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """x `[B, data_dim]` -> (mu, logvar), each `[B, latent_dim]`."""

    def __init__(self, data_dim: int, hidden_dims: list[int], latent_dim: int) -> None:
        super().__init__()
        self.net = mlp([data_dim, *hidden_dims, 2 * latent_dim])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.net(x).chunk(2, dim=-1)
        return mu, logvar


@dataclass
class ELBOTerms:
    """Per-point terms of one ELBO evaluation, each `[B]`, in nats."""

    reconstruction: Tensor  # E_q[log p(x|z)], one sample
    kl: Tensor  # KL(q(z|x) || p(z)): analytic, or log q(z|x) - log p(z) at the sample

    @property
    def elbo(self) -> Tensor:
        return self.reconstruction - self.kl


class VAE(nn.Module):
    """A VAE with a pluggable prior.

    Args:
        data_dim: number of (binary) pixels.
        latent_dim: size D of z.
        hidden_dims: hidden layer sizes of the encoder; the decoder mirrors them.
        prior: a `priors.base.Prior` over D-dimensional latents.
    """

    def __init__(self, data_dim: int, latent_dim: int, hidden_dims: list[int], prior: Prior) -> None:
        super().__init__()
        if prior.latent_dim != latent_dim:
            raise ValueError(
                f"{type(prior).__name__} has latent_dim={prior.latent_dim} but the VAE has latent_dim={latent_dim}"
            )
        self.data_dim = data_dim
        self.latent_dim = latent_dim
        self.encoder = Encoder(data_dim, list(hidden_dims), latent_dim)
        self.decoder = mlp([latent_dim, *reversed(list(hidden_dims)), data_dim])
        self.prior = prior

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """Bernoulli logits of p(x|z), `[..., data_dim]`."""
        return self.decoder(z)

    def log_likelihood(self, x: Tensor, logits: Tensor) -> Tensor:
        """log p(x|z) summed over pixels, from the decoder's logits: sum_p x_p l_p - softplus(l_p).

        `x` `[..., P]` broadcasts against `logits` `[..., P]` (importance sampling passes
        `x[:, None]` against `[B, K, P]`); the sum over x_p l_p is a batched matrix product,
        so the K samples never get a copy of `x`.
        """
        return torch.einsum("...p,...p->...", logits, x) - F.softplus(logits, threshold=50.0).sum(-1)

    def elbo_terms(self, x: Tensor, index: Tensor | None = None) -> ELBOTerms:
        """One-sample ELBO terms for a batch `x` `[B, data_dim]`.

        The KL is analytic when the prior has one; otherwise log q(z|x) - log p(z) at the
        reparameterized sample. With `index` (training-set indices `[B]`) the prior's
        `train_log_prob` is used, which lets the aggregate posterior leave each point out.
        """
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        reconstruction = self.log_likelihood(x, self.decode(z))
        if self.prior.has_analytic_kl:
            kl = self.prior.kl(mu, logvar)
        else:
            log_p = self.prior.log_prob(z) if index is None else self.prior.train_log_prob(z, index)
            kl = diagonal_normal_log_prob(z, mu, logvar) - log_p
        return ELBOTerms(reconstruction, kl)
