"""The exact aggregate posterior q(z) = 1/N sum_n q(z|x_n) over the whole training set, as the prior."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from priors.base import Encoder, Prior
from priors.densities import gaussian_mixture_logsumexp


class AggregatePosteriorPrior(Prior):
    """p(z) = 1/N sum_n q(z|x_n), all N training points, evaluated exactly.

    This is the prior that zeroes the marginal KL of ELBO surgery: with the encoder fixed,
    the best prior is the aggregate posterior itself. Every one of the N components enters
    every evaluation (no subsampling, no nearest-neighbour shortcut); the M x N work goes
    through `priors.densities.gaussian_mixture_logsumexp`, chunked.

    State: the training set's posterior parameters are the buffers `mu` and `logvar`
    (`[N, D]`), encoded without gradient from the current encoder by
    `on_train_epoch_start` every `refresh_every` epochs (and always when there are none
    yet), in batches of `encode_batch_size` on the encoder's device. `on_train_epoch_end`
    re-encodes the training set as evaluation sees it (fixed binarization) with the
    epoch's final encoder, so validation, the checkpoint and the surgery use the exact
    q(z) of the trained model (whose marginal KL is then zero up to rounding error), not
    the encodings of the epoch's start on its own binarization. They live in `state_dict`,
    so a checkpoint restores the prior exactly; loading one with a different N resizes
    them. `setup` sizes them from the training set and encodes its grey levels
    once, so a freshly built model has a usable prior.

    Leave-one-out in training: `train_log_prob(z, index)` leaves each point's own
    component out, log p(z_n) = logsumexp_{m != n} log q(z_n|x_m) - log(N - 1). Without
    that, the point's own component explains its sample and the encoder can shrink every
    posterior onto its point: the KL term is then bounded by log N (memorization), and the
    prior teaches nothing. Gradients flow to z (so to the encoder through the sample), not
    to the detached buffers. At evaluation (`log_prob`) the full mixture over all N is the
    prior, as in the surgery's definition of q(z).

    Sampling: n uniform on 1..N, then z ~ q(z|x_n).

    Args:
        latent_dim: size D of the latent space.
        refresh_every: re-encode the training set every this many epochs (>= 1).
        encode_batch_size: batch size of the re-encoding pass.
        chunk_size: passed to the kernel (points per chunk); None uses its default.

    References:
        Hoffman & Johnson, "ELBO surgery: yet another way to carve up the variational
        evidence lower bound", 2016; Tomczak & Welling, "VAE with a VampPrior", 2018 (the
        aggregate posterior as the optimal prior); Norouzi et al., "Exemplar VAE", 2020
        (leave-one-out exemplar prior).
    """

    def __init__(
        self,
        latent_dim: int,
        refresh_every: int = 1,
        encode_batch_size: int = 1000,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(latent_dim)
        if int(refresh_every) != refresh_every or refresh_every < 1:
            raise ValueError(f"AggregatePosteriorPrior: refresh_every must be an integer >= 1, got {refresh_every!r}")
        if encode_batch_size <= 0 or (chunk_size is not None and chunk_size <= 0):
            raise ValueError(
                f"AggregatePosteriorPrior: encode_batch_size and chunk_size must be positive, "
                f"got {encode_batch_size=}, {chunk_size=}"
            )
        self.refresh_every = int(refresh_every)
        self.encode_batch_size = int(encode_batch_size)
        self.chunk_size = chunk_size
        self.register_buffer("mu", torch.zeros(0, self.latent_dim))
        self.register_buffer("logvar", torch.zeros(0, self.latent_dim))
        # Whether mu/logvar hold encodings; a buffer so a checkpoint carries it.
        self.register_buffer("encoded", torch.tensor(False))

    @property
    def num_points(self) -> int:
        return self.mu.shape[0]

    # ---- hooks --------------------------------------------------------------------

    def setup(self, encoder: Encoder, train_x: Tensor) -> None:
        """Size the buffers to the training set and encode it once."""
        self.refresh(encoder, train_x)

    def on_train_epoch_start(self, epoch: int, encoder: Encoder, train_x: Tensor) -> None:
        """Re-encode the epoch's training inputs every `refresh_every` epochs."""
        if not bool(self.encoded) or epoch % self.refresh_every == 0 or len(train_x) != self.num_points:
            self.refresh(encoder, train_x)

    def on_train_epoch_end(self, epoch: int, encoder: Encoder, train_x: Tensor) -> None:
        """Re-encode the training set as evaluation sees it, with the epoch's final encoder."""
        self.refresh(encoder, train_x)

    @torch.no_grad()
    def refresh(self, encoder: Encoder, train_x: Tensor) -> None:
        """Encode `train_x` `[N, data_dim]` with `encoder` into the buffers `mu`, `logvar` `[N, D]`."""
        if train_x.dim() != 2 or len(train_x) < 2:
            raise ValueError(
                f"AggregatePosteriorPrior: needs train_x of shape [N, data_dim] with N >= 2, got {tuple(train_x.shape)}"
            )
        params = list(encoder.parameters()) if isinstance(encoder, nn.Module) else []
        device = params[0].device if params else self.mu.device
        dtype = params[0].dtype if params else train_x.dtype
        mus, logvars = [], []
        for batch in train_x.split(self.encode_batch_size):
            mu, logvar = encoder(batch.to(device=device, dtype=dtype))
            if mu.shape != (len(batch), self.latent_dim) or logvar.shape != mu.shape:
                raise ValueError(
                    f"AggregatePosteriorPrior: the encoder gave mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)} "
                    f"for {len(batch)} inputs, expected ({len(batch)}, {self.latent_dim}) each (latent_dim={self.latent_dim})"
                )
            mus.append(mu)
            logvars.append(logvar)
        # Buffers keep the prior's own dtype and device (so .double() or .to() of the model holds).
        self.mu = torch.cat(mus).to(self.mu)
        self.logvar = torch.cat(logvars).to(self.logvar)
        self.encoded.fill_(True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A checkpoint may hold a different N than this prior was sized for: take its size.
        for name in ("mu", "logvar"):
            incoming = state_dict.get(prefix + name)
            if incoming is not None and incoming.dim() == 2 and incoming.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(incoming, dtype=getattr(self, name).dtype, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- the contract ---------------------------------------------------------------

    def _check_encoded(self, method: str) -> None:
        if not bool(self.encoded) or self.num_points == 0:
            raise RuntimeError(
                f"AggregatePosteriorPrior.{method}: there are no encodings of the training set yet; call "
                f"setup(encoder, train_x) (vae.build_model does) or on_train_epoch_start, or load a checkpoint"
            )

    def _kernel_kwargs(self) -> dict:
        return {} if self.chunk_size is None else {"chunk_size": self.chunk_size}

    def _log_prob(self, z: Tensor) -> Tensor:
        self._check_encoded("log_prob")
        flat = z.reshape(-1, self.latent_dim)
        lse = gaussian_mixture_logsumexp(flat, self.mu, self.logvar, **self._kernel_kwargs())
        return (lse - math.log(self.num_points)).reshape(z.shape[:-1])

    def _train_log_prob(self, z: Tensor, index: Tensor) -> Tensor:
        self._check_encoded("train_log_prob")
        n = self.num_points
        flat_index = index.reshape(-1).to(device=z.device, dtype=torch.int64)
        if flat_index.numel() and (flat_index.min() < 0 or flat_index.max() >= n):
            raise IndexError(
                f"AggregatePosteriorPrior.train_log_prob: index values must lie in [0, {n}) (N={n} encoded training "
                f"points), got range [{int(flat_index.min())}, {int(flat_index.max())}]"
            )
        flat = z.reshape(-1, self.latent_dim)
        lse = gaussian_mixture_logsumexp(flat, self.mu, self.logvar, exclude=flat_index, **self._kernel_kwargs())
        return (lse - math.log(n - 1)).reshape(z.shape[:-1])

    def _sample(self, n: int) -> Tensor:
        self._check_encoded("sample")
        k = torch.randint(self.num_points, (n,), device=self.mu.device)
        eps = torch.randn(n, self.latent_dim, device=self.mu.device, dtype=self.mu.dtype)
        return self.mu[k] + torch.exp(0.5 * self.logvar[k]) * eps

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, num_points={self.num_points}, refresh_every={self.refresh_every}"
