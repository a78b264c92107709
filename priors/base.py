"""The Prior contract: a distribution over latent vectors, nothing more.

A prior is a `torch.nn.Module` over latent vectors of size `latent_dim`. Shapes mirror
`torch.distributions`:

* `log_prob(z, context=None)`: `z` of shape `[..., D]` gives `[...]`, the log density
  with every normalizing constant kept (the surgery evaluator reports absolute nats).
  `context` conditions the density, as in nflows: during training the VAE passes the
  batch's training-set indices (int64, `[...]`), which a prior built on the training set
  (aggregate, exemplar) uses to leave each point's own component out. A prior whose
  `_log_prob(z)` takes no `context` parameter never sees one.
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

What a prior needs from the model it gets when it is built. A prior config that is a
`_partial_: true` node is completed by `vae.build_model` with `encoder=` (the VAE's
encoder, `x [B, P] -> (mu, logvar)`) and `train_x=` (the training inputs `[N, P]`, grey
levels in [0, 1], on the CPU); the VampPrior and the exemplar prior are built that way.
Work that must happen as training goes (re-encoding the training set each epoch) is the
trainer's, through callbacks (`vae.callbacks`), never a method of this contract.

A researcher's own prior lives in their module and plugs in with
`python train.py prior._target_=mypkg.MyPrior`; Hydra passes `latent_dim`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

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
    #: Whether `_log_prob` takes a `context` argument (set for each subclass from its signature).
    takes_context: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.takes_context = "context" in inspect.signature(cls._log_prob).parameters

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        if int(latent_dim) != latent_dim or latent_dim <= 0:
            raise ValueError(f"{type(self).__name__}: latent_dim must be a positive integer, got {latent_dim!r}")
        self.latent_dim = int(latent_dim)

    # ---- public: validate, then call the implementation --------------------------

    def log_prob(self, z: Tensor, context: Any = None) -> Tensor:
        """Log density log p(z | context).

        Args:
            z: latents, shape `[..., D]`.
            context: what the density is conditioned on, or None. During training the VAE
                passes training-set indices of shape `[...]` (leave-one-out priors use
                them); a prior that takes no context ignores it.

        Returns:
            Shape `[...]`.
        """
        self._check_latent(z, "log_prob", "z")
        if self.takes_context:
            if isinstance(context, Tensor) and context.shape != z.shape[:-1]:
                raise PriorShapeError(
                    f"{type(self).__name__}.log_prob expects a context of shape {tuple(z.shape[:-1])} "
                    f"(z's shape without the last dimension), got {tuple(context.shape)}"
                )
            out = self._log_prob(z, context=context)
        else:
            out = self._log_prob(z)
        self._check_output(out, z.shape[:-1], "_log_prob")
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

    # ---- to implement -----------------------------------------------------------

    def _log_prob(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def _sample(self, n: int) -> Tensor:
        raise NotImplementedError

    def _kl(self, mu: Tensor, logvar: Tensor) -> Tensor:
        raise NotImplementedError

    def _log_prob_per_dim(self, z: Tensor) -> Tensor:
        raise NotImplementedError

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
            raise PriorShapeError(f"{type(self).__name__}.{method} returned shape {got}, expected {tuple(expected)}")

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}"
