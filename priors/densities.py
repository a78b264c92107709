"""Log densities shared by the priors, the VAE and the surgery evaluator.

Every density keeps its full normalizing constant: the surgery terms (mutual
information, marginal KL) are absolute numbers and a dropped -1/2 log(2 pi) makes
them wrong.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)


def diagonal_normal_log_prob(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """Log density of a diagonal Gaussian, summed over the last dimension.

    Args:
        z: points, shape `[..., D]`.
        mu: means, broadcastable to `z`.
        logvar: log variances, broadcastable to `z`.

    Returns:
        `log N(z; mu, diag(exp(logvar)))`, shape the broadcast of the inputs without
        the last dimension.
    """
    return -0.5 * (LOG_2PI + logvar + (z - mu).square() * torch.exp(-logvar)).sum(-1)


def diagonal_normal_kl(mu: Tensor, logvar: Tensor, prior_mu: Tensor, prior_logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))), diagonal, summed over the last dim.

    Returns:
        Shape of the broadcast inputs without the last dimension.
    """
    var_ratio = torch.exp(logvar - prior_logvar)
    mean_term = (mu - prior_mu).square() * torch.exp(-prior_logvar)
    return 0.5 * (var_ratio + mean_term - 1.0 - (logvar - prior_logvar)).sum(-1)


def gaussian_mixture_logsumexp(
    z: Tensor,
    mu: Tensor,
    logvar: Tensor,
    exclude: Tensor | None = None,
    chunk_size: int = 16,
) -> Tensor:
    """logsumexp over components n of log N(z_m; mu_n, diag(exp(logvar_n))).

    The hot spot of the aggregate-posterior prior and of the surgery evaluator. Chunked
    over the M points, so at most `chunk_size x N x D` elements are live at once.

    Args:
        z: points, `[M, D]`.
        mu: component means, `[N, D]`.
        logvar: component log variances, `[N, D]`.
        exclude: optional `[M]` int64; row m leaves component `exclude[m]` out (a
            negative value leaves nothing out).
        chunk_size: points per chunk.

    Returns:
        `[M]`. Subtract `log N` (or `log(N - 1)` with `exclude`) for the mixture's log density.
    """
    out = []
    for start in range(0, z.shape[0], chunk_size):
        zc = z[start : start + chunk_size]
        lp = diagonal_normal_log_prob(zc[:, None, :], mu, logvar)
        if exclude is not None:
            ex = exclude[start : start + chunk_size]
            rows = torch.nonzero(ex >= 0).squeeze(-1)
            lp = lp.index_put((rows, ex[rows]), torch.tensor(-torch.inf, dtype=lp.dtype, device=lp.device))
        out.append(torch.logsumexp(lp, dim=-1))
    return torch.cat(out) if out else z.new_zeros(0)
