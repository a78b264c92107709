"""A worked example of a user's own prior, outside the priorlab packages.

A factorized Student-t prior p(z) = prod_d t_nu(z_d; 0, s), with the degrees of freedom
nu and the scale s learned (or fixed), per dimension. Train with it, without editing
priorlab, from the repository root:

    python train.py prior._target_=examples.student_t_prior.StudentTPrior

and run the prior conformance suite on it (the suite runs on this class by default, as its
reference heavy-tailed prior; `--prior` runs it on any class of yours the same way):

    python -m pytest tests/priors/test_prior_contract.py --prior examples.student_t_prior.StudentTPrior

A heavy tail is what a fixed grid cannot integrate to the suite's precision (with df = 1 the
mass beyond |z| = 1e5 is 6e-6 per dimension), so the suite's normalization check samples
where its grid cannot vouch for itself (tested down to df = 1, a Cauchy density, at scales of order 1).

Both import `examples.student_t_prior` from the current directory, so run them from the
repository root (`python train.py` and `python -m pytest` put it on sys.path).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from priors.base import Prior


class StudentTPrior(Prior):
    """Factorized Student-t prior, location 0, with learned or fixed dof and scale per dimension.

    log p(z_d) = lgamma((nu+1)/2) - lgamma(nu/2) - 1/2 log(nu pi) - log s
                 - (nu+1)/2 log(1 + (z_d/s)^2 / nu)

    with every constant kept. nu and s are stored as logs, so they stay positive.

    Args:
        latent_dim: size D of the latent space.
        df: initial (or fixed) degrees of freedom nu > 0.
        scale: initial (or fixed) scale s > 0.
        learn_df: learn nu (a parameter) or keep it fixed (a buffer).
        learn_scale: learn s or keep it fixed.

    References:
        Student, "The probable error of a mean", Biometrika 1908; for heavy-tailed VAE
        priors, e.g. Abiri & Ohlsson, "Variational auto-encoders with Student's
        t-prior", 2019.
    """

    is_factorized = True

    def __init__(
        self, latent_dim: int, df: float = 5.0, scale: float = 1.0, learn_df: bool = True, learn_scale: bool = True
    ) -> None:
        super().__init__(latent_dim)
        if df <= 0 or scale <= 0:
            raise ValueError(f"StudentTPrior: df and scale must be positive, got {df=}, {scale=}")
        log_df = torch.full((self.latent_dim,), math.log(df))
        log_scale = torch.full((self.latent_dim,), math.log(scale))
        if learn_df:
            self.log_df = nn.Parameter(log_df)
        else:
            self.register_buffer("log_df", log_df)
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def _log_prob_per_dim(self, z: Tensor) -> Tensor:
        nu = torch.exp(self.log_df)
        y = z * torch.exp(-self.log_scale)
        return (
            torch.lgamma(0.5 * (nu + 1.0))
            - torch.lgamma(0.5 * nu)
            - 0.5 * torch.log(nu * math.pi)
            - self.log_scale
            - 0.5 * (nu + 1.0) * torch.log1p(y.square() / nu)
        )

    def _log_prob(self, z: Tensor) -> Tensor:
        return self._log_prob_per_dim(z).sum(-1)

    def _sample(self, n: int) -> Tensor:
        dist = torch.distributions.StudentT(torch.exp(self.log_df.detach()), scale=torch.exp(self.log_scale.detach()))
        return dist.sample((n,))
