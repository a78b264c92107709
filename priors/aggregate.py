"""The exact aggregate posterior q(z) = 1/N sum_n q(z|x_n) over the whole training set, as the prior."""

from __future__ import annotations

import torch
from torch import Tensor

from priors.base import Prior
from priors.densities import DiagonalGaussianMixture


class AggregatePosteriorPrior(Prior):
    """p(z) = 1/N sum_n q(z|x_n), all N training points, evaluated exactly.

    This is the prior that zeroes the marginal KL of ELBO surgery: with the encoder fixed,
    the best prior is the aggregate posterior itself. Every one of the N components enters
    every evaluation (no subsampling, no nearest-neighbour shortcut), through the exact
    kernel of `priors.densities.DiagonalGaussianMixture`.

    State: the training set's posterior parameters, the buffers `mu` and `logvar` (`[N, D]`),
    detached. They are filled by the trainer's `vae.callbacks.TrainingSetEncodings` callback
    (`update_encodings`): before training if empty, then after every epoch, from one encoding
    pass of the training set as the surgery sees it (`data.split("train")`) with the epoch's
    final encoder. So validation, the checkpoint and the surgery use the exact q(z) of the
    trained model (its marginal KL is zero up to rounding), and the next epoch trains against
    it. They live in `state_dict`, so a checkpoint restores the prior exactly; loading one
    with a different N resizes them.

    Training (`context` = the batch's training-set indices): each point leaves its own
    component out, log p(z_n) = logsumexp_{m != n} log q(z_n|x_m) - log(N - 1); without that
    the point's own component explains its sample, and the encoder can shrink every
    posterior onto its point (the KL is then bounded by log N: memorization). Gradients flow
    to z, not to the detached components: see docs/priors.md for what that does to training,
    and `prior=exemplar` for the variant that learns. Evaluation (no context): the full
    mixture over all N.

    Sampling: n uniform on 1..N, then z ~ q(z|x_n).

    Args:
        latent_dim: size D of the latent space.
        chunk_size: the kernel's points per block.

    References:
        Hoffman & Johnson, "ELBO surgery", 2016; Tomczak & Welling, "VAE with a VampPrior",
        2018 (the aggregate posterior as the optimal prior).
    """

    def __init__(self, latent_dim: int, chunk_size: int = 2048) -> None:
        super().__init__(latent_dim)
        if int(chunk_size) != chunk_size or chunk_size <= 0:
            raise ValueError(f"AggregatePosteriorPrior: chunk_size must be a positive integer, got {chunk_size!r}")
        self.chunk_size = int(chunk_size)
        self.register_buffer("mu", torch.zeros(0, self.latent_dim))
        self.register_buffer("logvar", torch.zeros(0, self.latent_dim))
        self._mixture: DiagonalGaussianMixture | None = None

    @property
    def num_points(self) -> int:
        return self.mu.shape[0]

    # ---- filled by vae.callbacks.TrainingSetEncodings ------------------------------

    @property
    def needs_encodings(self) -> bool:
        return self.num_points == 0

    @torch.no_grad()
    def update_encodings(self, mu: Tensor, logvar: Tensor) -> None:
        """Take the training set's posteriors `[N, D]` (N >= 2) as the components."""
        if mu.dim() != 2 or mu.shape[1] != self.latent_dim or mu.shape != logvar.shape or len(mu) < 2:
            raise ValueError(
                f"AggregatePosteriorPrior: needs encodings mu, logvar of shape [N, {self.latent_dim}] with N >= 2, "
                f"got {tuple(mu.shape)} and {tuple(logvar.shape)}"
            )
        # Buffers keep the prior's own dtype and device (so .double() or .to() of the model holds).
        self.mu = mu.detach().to(self.mu)
        self.logvar = logvar.detach().to(self.logvar)
        self._mixture = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A checkpoint may hold a different N than this prior was sized for: take its size.
        for name in ("mu", "logvar"):
            incoming = state_dict.get(prefix + name)
            if incoming is not None and incoming.dim() == 2 and incoming.shape != getattr(self, name).shape:
                setattr(
                    self,
                    name,
                    torch.empty_like(incoming, dtype=getattr(self, name).dtype, device=getattr(self, name).device),
                )
        self._mixture = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._mixture = None  # .to() / .double() move the buffers: the mixture's constants follow
        return super()._apply(fn, recurse)

    # ---- the contract ---------------------------------------------------------------

    def mixture(self) -> DiagonalGaussianMixture:
        """q(z) as a `DiagonalGaussianMixture` (its constants computed once per encoding)."""
        if self.num_points == 0:
            raise RuntimeError(
                "AggregatePosteriorPrior has no encodings of the training set yet: the trainer's TrainingSetEncodings "
                "callback gives them (or update_encodings(mu, logvar), or load a checkpoint)"
            )
        if self._mixture is None:
            self._mixture = DiagonalGaussianMixture(
                self.mu, self.logvar, chunk_size=self.chunk_size, small_components=0
            )
        return self._mixture

    def _log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        mixture = self.mixture()
        if context is not None:
            n = self.num_points
            if context.numel() and (int(context.min()) < 0 or int(context.max()) >= n):
                raise IndexError(
                    f"AggregatePosteriorPrior.log_prob: context indices must lie in [0, {n}) (N={n} encoded "
                    f"training points), got range [{int(context.min())}, {int(context.max())}]"
                )
        return mixture.log_prob(z, exclude=context)

    def _sample(self, n: int) -> Tensor:
        return self.mixture().sample(n)

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, num_points={self.num_points}"
