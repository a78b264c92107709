"""The Prior contract.

A prior is a `torch.nn.Module` over latent vectors of size `latent_dim`. Shapes mirror
`torch.distributions`:

* `log_prob(z)`: `z` of shape `[..., D]` gives `[...]`, the log density with every
  normalizing constant kept (the surgery evaluator reports absolute nats).
* `sample(n)`: a tensor of shape `[n, D]`.
* `kl(mu, logvar)`: optional analytic KL(q(z|x) || p(z)) for a diagonal-Gaussian
  posterior, shape `[...]`. Priors that have one set `has_analytic_kl = True`; the VAE
  falls back to a one-sample Monte Carlo estimate otherwise.
* `log_prob_per_dim(z)`: optional, for factorized priors p(z) = prod_d p_d(z_d) only
  (`is_factorized = True`): `[..., D]`, the per-dimension log densities that sum to
  `log_prob(z)`. The surgery evaluator needs it for the dimension-wise KL.
* All state lives in `state_dict` (parameters and buffers), so checkpoints restore a
  prior exactly.

Public methods validate shapes and call the private `_log_prob`, `_sample` and `_kl`
that subclasses implement ("public validates, private implements", as in nflows), so
every prior raises the same clear error for a wrong shape.

Hooks for priors that depend on the model or the data, called by `vae.build_model`
and `vae.trainer.Trainer` (a prior that needs none of them ignores them):

* `setup(encoder, train_x)`: once, after the model is built and before training or
  loading a checkpoint. `encoder` maps a batch `[B, data_dim]` to `(mu, logvar)`, each
  `[B, D]`; `train_x` holds the training inputs `[N, data_dim]` (grey levels in
  [0, 1], on the CPU). The VampPrior keeps the encoder here and can initialize its
  pseudo-inputs from `train_x`. Do not register the encoder as a submodule (its
  parameters belong to the VAE): store it with `object.__setattr__`.
* `on_train_epoch_start(epoch, encoder, train_x)`: at the start of every training
  epoch, with the inputs the epoch trains on (`train_x[i]` is the point with index
  `i`). The exact aggregate posterior refreshes its encodings of the training set here.
* `on_train_epoch_end(epoch, encoder, train_x)`: after every complete training epoch,
  before validation and the checkpoint, with the training set as evaluation sees it
  (`data.split("train")`, binarized once with the fixed seed; the surgery decomposes that
  same tensor). A prior whose state depends on the encoder brings it up to date here, so
  validation, the checkpoint and the surgery see the prior of the trained encoder. The
  exact aggregate posterior re-encodes the training set, which makes it equal to the
  surgery's q(z).
* `train_log_prob(z, index)`: the log density used inside the training loss, where
  `index` (`[...]`, int64) holds the training-set indices of the points whose
  posterior samples `z` are. It defaults to `log_prob(z)`; the aggregate posterior
  overrides it to leave each point's own component out.

A researcher's own prior lives in their module and plugs in with
`python train.py prior._target_=mypkg.MyPrior`; Hydra passes `latent_dim`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

Encoder = Callable[[Tensor], tuple[Tensor, Tensor]]


class PriorShapeError(ValueError):
    """A tensor given to or returned by a prior has the wrong shape."""


class Prior(nn.Module):
    """Base class of every prior p(z) over `latent_dim`-dimensional latents.

    Args:
        latent_dim: size D of the latent space.
    """

    has_analytic_kl: bool = False
    is_factorized: bool = False

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        if int(latent_dim) != latent_dim or latent_dim <= 0:
            raise ValueError(f"{type(self).__name__}: latent_dim must be a positive integer, got {latent_dim!r}")
        self.latent_dim = int(latent_dim)

    # ---- public: validate, then call the implementation --------------------------

    def log_prob(self, z: Tensor) -> Tensor:
        """Log density log p(z).

        Args:
            z: latents, shape `[..., D]`.

        Returns:
            Shape `[...]`.
        """
        self._check_latent(z, "log_prob", "z")
        out = self._log_prob(z)
        self._check_output(out, z.shape[:-1], "_log_prob")
        return out

    def train_log_prob(self, z: Tensor, index: Tensor) -> Tensor:
        """Log density used in the training loss; `index` holds training-set indices, shape `[...]`."""
        self._check_latent(z, "train_log_prob", "z")
        if index.shape != z.shape[:-1]:
            raise PriorShapeError(
                f"{type(self).__name__}.train_log_prob expects index of shape {tuple(z.shape[:-1])} "
                f"(z's shape without the last dimension), got {tuple(index.shape)}"
            )
        out = self._train_log_prob(z, index)
        self._check_output(out, z.shape[:-1], "_train_log_prob")
        return out

    def sample(self, n: int) -> Tensor:
        """Draw `n` samples, shape `[n, D]`."""
        if int(n) != n or n < 0:
            raise ValueError(f"{type(self).__name__}.sample expects a non-negative integer n, got {n!r}")
        out = self._sample(int(n))
        self._check_output(out, torch.Size([int(n), self.latent_dim]), "_sample")
        return out

    def kl(self, mu: Tensor, logvar: Tensor) -> Tensor:
        """Analytic KL(N(mu, diag(exp(logvar))) || p), shape `[...]` for inputs `[..., D]`."""
        if not self.has_analytic_kl:
            raise NotImplementedError(f"{type(self).__name__} has no analytic KL; use a Monte Carlo estimate")
        self._check_latent(mu, "kl", "mu")
        if logvar.shape != mu.shape:
            raise PriorShapeError(
                f"{type(self).__name__}.kl expects mu and logvar of the same shape, "
                f"got {tuple(mu.shape)} and {tuple(logvar.shape)}"
            )
        out = self._kl(mu, logvar)
        self._check_output(out, mu.shape[:-1], "_kl")
        return out

    def log_prob_per_dim(self, z: Tensor) -> Tensor:
        """Per-dimension log densities `[..., D]` of a factorized prior; they sum to `log_prob(z)`."""
        if not self.is_factorized:
            raise NotImplementedError(f"{type(self).__name__} is not factorized: it has no per-dimension densities")
        self._check_latent(z, "log_prob_per_dim", "z")
        out = self._log_prob_per_dim(z)
        self._check_output(out, z.shape, "_log_prob_per_dim")
        return out

    # ---- hooks (no-ops by default) ----------------------------------------------

    def setup(self, encoder: Encoder, train_x: Tensor) -> None:
        """Called once after the model is built; see the module docstring."""

    def on_train_epoch_start(self, epoch: int, encoder: Encoder, train_x: Tensor) -> None:
        """Called at the start of every training epoch; see the module docstring."""

    def on_train_epoch_end(self, epoch: int, encoder: Encoder, train_x: Tensor) -> None:
        """Called after every complete training epoch; see the module docstring."""

    # ---- to implement -----------------------------------------------------------

    def _log_prob(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def _sample(self, n: int) -> Tensor:
        raise NotImplementedError

    def _kl(self, mu: Tensor, logvar: Tensor) -> Tensor:
        raise NotImplementedError

    def _log_prob_per_dim(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def _train_log_prob(self, z: Tensor, index: Tensor) -> Tensor:
        return self._log_prob(z)

    # ---- checks -----------------------------------------------------------------

    def _check_latent(self, z: Tensor, method: str, name: str) -> None:
        if not isinstance(z, Tensor) or z.dim() < 1 or z.shape[-1] != self.latent_dim:
            got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise PriorShapeError(
                f"{type(self).__name__}.{method} expects {name} of shape [..., {self.latent_dim}] "
                f"(latent_dim={self.latent_dim}), got {got}"
            )

    def _check_output(self, out: Tensor, expected: torch.Size, method: str) -> None:
        if not isinstance(out, Tensor) or out.shape != expected:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise PriorShapeError(
                f"{type(self).__name__}.{method} returned shape {got}, expected {tuple(expected)}"
            )

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}"
