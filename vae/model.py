"""The VAE: an encoder to a diagonal Gaussian q(z|x), a decoder to Bernoulli logits, a prior p(z)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from priors.base import Prior
from priors.densities import diagonal_normal_log_prob, reparameterize
from vae.networks import MLPDecoder, MLPEncoder

#: The VAE's networks, by attribute: what `trainer.freeze` and a fit (`lab.fit`) keep fixed or refit.
NETWORKS = ("encoder", "decoder")


@dataclass
class ELBOTerms:
    """Per-point terms of one ELBO evaluation, each `[B]`, in nats."""

    reconstruction: Tensor  # E_q[log p(x|z)], one sample
    kl: Tensor  # KL(q(z|x) || p(z)): analytic, or log q(z|x) - log p(z) at the sample

    @property
    def elbo(self) -> Tensor:
        return self.reconstruction - self.kl


class VAE(nn.Module):
    """A VAE with a pluggable encoder, decoder and prior.

    Args:
        encoder: x `[B, data_dim]` -> (mu, logvar), each `[B, D]` (contract: `vae.networks`).
        decoder: z `[..., D]` -> Bernoulli logits `[..., data_dim]`.
        prior: a `priors.base.Prior` over D-dimensional latents.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, prior: Prior, latent_dim: int | None = None) -> None:
        super().__init__()
        if latent_dim is not None and prior.latent_dim != latent_dim:
            raise ValueError(
                f"{type(prior).__name__} has latent_dim={prior.latent_dim} but the VAE has latent_dim={latent_dim}"
            )
        self.encoder = encoder
        self.decoder = decoder
        self.prior = prior
        self.latent_dim = prior.latent_dim

    @classmethod
    def mlp(cls, data_dim: int, latent_dim: int, hidden_dims: list[int], prior: Prior) -> VAE:
        """The ReLU-MLP VAE that `vae=mlp` builds, for scripts and tests."""
        return cls(
            MLPEncoder(data_dim, latent_dim, hidden_dims),
            MLPDecoder(data_dim, latent_dim, hidden_dims),
            prior,
            latent_dim,
        )

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
        reparameterized sample. `index` (training-set indices `[B]`) is passed to the prior
        as its context, which lets the aggregate and exemplar priors leave each point out.
        """
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar)
        reconstruction = self.log_likelihood(x, self.decode(z))
        if self.prior.has_analytic_kl:
            kl = self.prior.kl(mu, logvar)
        else:
            kl = diagonal_normal_log_prob(z, mu, logvar) - self.prior.log_prob(z, context=index)
        return ELBOTerms(reconstruction, kl)
