"""priors/gaussian.py: the standard normal prior against torch.distributions, its analytic KL, samples and state."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from priors.base import PriorShapeError
from priors.gaussian import GaussianPrior


def test_log_prob_matches_torch_distributions_float64() -> None:
    prior = GaussianPrior(5).double()
    z = torch.randn(7, 3, 5, dtype=torch.float64) * 2
    expected = Independent(Normal(torch.zeros(5, dtype=torch.float64), 1.0), 1).log_prob(z)
    torch.testing.assert_close(prior.log_prob(z), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(prior.log_prob_per_dim(z).sum(-1), expected, rtol=0, atol=1e-12)


MU = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
LOGVAR = torch.tensor([[-1.0, 0.5, 0.0], [0.3, -0.2, 0.1]], dtype=torch.float64)


def test_analytic_kl_matches_torch_distributions_and_known_values() -> None:
    prior = GaussianPrior(3).double()
    standard = Normal(torch.zeros(3, dtype=torch.float64), 1.0)
    expected = kl_divergence(Normal(MU, torch.exp(0.5 * LOGVAR)), standard).sum(-1)
    torch.testing.assert_close(prior.kl(MU, LOGVAR), expected, rtol=0, atol=1e-12)
    zeros = torch.zeros(4, 3, dtype=torch.float64)
    assert torch.equal(prior.kl(zeros, zeros), torch.zeros(4, dtype=torch.float64))  # q = p
    # mean 1 in one dimension: 1/2; variance 2 in another: (2 - 1 - log 2) / 2
    mu = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    logvar = torch.tensor([0.0, math.log(2.0), 0.0], dtype=torch.float64)
    assert abs(prior.kl(mu, logvar).item() - (0.5 + 0.5 * (1.0 - math.log(2.0)))) < 1e-15


def test_analytic_kl_matches_monte_carlo_within_its_standard_error() -> None:
    torch.manual_seed(0)
    prior = GaussianPrior(3).double()
    q = Independent(Normal(MU, torch.exp(0.5 * LOGVAR)), 1)
    p = Independent(Normal(torch.zeros(3, dtype=torch.float64), 1.0), 1)
    z = q.sample((200_000,))
    samples = q.log_prob(z) - p.log_prob(z)
    mc, stderr = samples.mean(0), samples.std(0) / samples.shape[0] ** 0.5
    analytic = prior.kl(MU, LOGVAR)
    assert ((analytic - mc).abs() < 4 * stderr).all(), (analytic, mc, stderr)


def test_sample_shape_and_moments() -> None:
    torch.manual_seed(0)
    z = GaussianPrior(4).sample(50_000)
    assert z.shape == (50_000, 4)
    assert z.mean(0).abs().max() < 0.03 and (z.var(0) - 1).abs().max() < 0.03


def test_shape_errors_name_the_prior_and_the_expected_shape() -> None:
    prior = GaussianPrior(4)
    with pytest.raises(PriorShapeError, match=r"GaussianPrior.log_prob expects z of shape \[\.\.\., 4\].*got \(2, 3\)"):
        prior.log_prob(torch.zeros(2, 3))
    with pytest.raises(PriorShapeError, match=r"GaussianPrior.kl expects mu and logvar of the same shape"):
        prior.kl(torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="latent_dim must be a positive integer"):
        GaussianPrior(0)


def test_state_dict_round_trip_restores_the_buffers_that_define_the_density() -> None:
    saved = GaussianPrior(3).double()
    with torch.no_grad():  # a prior whose state differs from a fresh one's
        saved.mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        saved.logvar.copy_(torch.tensor([0.3, -0.7, 1.1]))
    assert set(saved.state_dict()) == {"mean", "logvar"}
    fresh = GaussianPrior(3).double()
    z = torch.randn(10, 3, dtype=torch.float64)
    mu, logvar = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    assert not torch.allclose(fresh.log_prob(z), saved.log_prob(z))
    fresh.load_state_dict(saved.state_dict())
    assert torch.equal(fresh.log_prob(z), saved.log_prob(z))
    assert torch.equal(fresh.log_prob_per_dim(z), saved.log_prob_per_dim(z))
    assert torch.equal(fresh.kl(mu, logvar), saved.kl(mu, logvar))
    torch.manual_seed(1)
    a = fresh.sample(5)
    torch.manual_seed(1)
    assert torch.equal(a, saved.sample(5))
    # and the loaded state is the density it claims: N(mean, diag(exp(logvar)))
    reference = Independent(Normal(saved.mean, torch.exp(0.5 * saved.logvar)), 1).log_prob(z)
    torch.testing.assert_close(fresh.log_prob(z), reference, rtol=0, atol=1e-12)
