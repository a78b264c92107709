"""The VampPrior: a mixture of the encoder's posteriors at K learned pseudo-inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from priors.base import Encoder, Prior
from priors.densities import DiagonalGaussianMixture

INITS = ("random", "data")


class VampPrior(Prior):
    """p(z) = 1/K sum_k q(z | u_k) with K learned pseudo-inputs u_k in data space.

    The pseudo-inputs go through the VAE's own encoder, so the prior moves with it. They
    are kept in [0, 1] as in the paper, which maps an identity input through a linear layer
    and a hardtanh(0, 1): here the K x data_dim weight of that layer is the parameter
    `pseudo_inputs_raw`, and `pseudo_inputs = hardtanh(pseudo_inputs_raw, 0, 1)` (the same
    function, without the K x K identity matmul). As in the paper, a raw value pushed
    outside [0, 1] gets no gradient until the encoder's gradient pushes it back.

    Built as a `_partial_` node (conf/prior/vampprior.yaml): `vae.build_model` completes it
    with the VAE's encoder and the training inputs. The encoder is held without being
    registered as a submodule: its parameters belong to the VAE (registering it would put
    a second copy of them in the prior's `state_dict`). The pseudo-inputs' encodings are
    recomputed on every call, so gradients reach the pseudo-inputs and the encoder.

    Args:
        latent_dim: size D of the latent space.
        encoder: the VAE's encoder, `x [B, P] -> (mu, logvar)`.
        train_x: the training inputs `[N, P]`: their size P sizes the pseudo-inputs, and
            `init="data"` draws K of them.
        num_components: K, the number of pseudo-inputs (> 0); the paper uses 500 on MNIST.
        init: `"random"` (the paper's default: N(init_mean, init_std^2), clipped to
            [0, 1]) or `"data"` (K training inputs drawn at random).
        init_mean: mean of the random initialization (the paper's MNIST value is 0.05).
        init_std: standard deviation of the random initialization (paper: 0.01).

    References:
        Tomczak & Welling, "VAE with a VampPrior", AISTATS 2018.
    """

    def __init__(
        self,
        latent_dim: int,
        encoder: Encoder,
        train_x: Tensor,
        num_components: int = 500,
        init: str = "random",
        init_mean: float = 0.05,
        init_std: float = 0.01,
    ) -> None:
        super().__init__(latent_dim)
        if int(num_components) != num_components or num_components <= 0:
            raise ValueError(f"VampPrior: num_components (K) must be a positive integer, got {num_components!r}")
        if init not in INITS:
            raise ValueError(f"VampPrior: init must be one of {INITS}, got {init!r}")
        if not isinstance(train_x, Tensor) or train_x.dim() != 2:
            raise ValueError(
                f"VampPrior expects train_x of shape [N, data_dim], got {getattr(train_x, 'shape', train_x)!r}"
            )
        self.num_components = int(num_components)
        self.init = init
        n, data_dim = train_x.shape
        if init == "data":
            if n < self.num_components:
                raise ValueError(
                    f"VampPrior: init='data' needs at least K={self.num_components} training points, got {n}"
                )
            raw = train_x[torch.randperm(n)[: self.num_components]].clone()
        else:
            raw = init_mean + init_std * torch.randn(self.num_components, data_dim)
        params = list(encoder.parameters()) if isinstance(encoder, nn.Module) else []
        self.pseudo_inputs_raw = nn.Parameter(raw.to(params[0]) if params else raw)  # the encoder's dtype and device
        object.__setattr__(self, "_encoder", encoder)
        mu, logvar = self.components()
        if mu.shape != (self.num_components, self.latent_dim) or logvar.shape != mu.shape:
            raise ValueError(
                f"VampPrior: the encoder maps pseudo-inputs to mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)}, "
                f"expected ({self.num_components}, {self.latent_dim}) each (latent_dim={self.latent_dim})"
            )

    @property
    def data_dim(self) -> int:
        return self.pseudo_inputs_raw.shape[1]

    @property
    def pseudo_inputs(self) -> Tensor:
        """The pseudo-inputs u_k in [0, 1], `[K, data_dim]`."""
        return F.hardtanh(self.pseudo_inputs_raw, 0.0, 1.0)

    def components(self) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of q(z|u_k), each `[K, D]`."""
        return self._encoder(self.pseudo_inputs)

    def mixture(self) -> DiagonalGaussianMixture:
        return DiagonalGaussianMixture(*self.components())

    # ---- the contract ---------------------------------------------------------------

    def _log_prob(self, z: Tensor) -> Tensor:
        return self.mixture().log_prob(z)

    def _sample(self, n: int) -> Tensor:
        return self.mixture().sample(n)

    def extra_repr(self) -> str:
        sizes = f"latent_dim={self.latent_dim}, num_components={self.num_components}, data_dim={self.data_dim}"
        return f"{sizes}, init={self.init!r}"
