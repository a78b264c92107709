"""Priors p(z) for VAEs. Each prior is one module; `base.Prior` is the contract."""

from priors.base import Prior
from priors.gaussian import GaussianPrior

__all__ = ["Prior", "GaussianPrior"]
