from __future__ import annotations

import pytest
import torch
from torch.distributions import Independent, Normal

from priors.base import PriorShapeError
from priors.gaussian import GaussianPrior


def test_log_prob_matches_torch_distributions_float64() -> None:
    prior = GaussianPrior(5).double()
    z = torch.randn(7, 3, 5, dtype=torch.float64) * 2
    expected = Independent(Normal(torch.zeros(5, dtype=torch.float64), 1.0), 1).log_prob(z)
    torch.testing.assert_close(prior.log_prob(z), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(prior.log_prob_per_dim(z).sum(-1), expected, rtol=0, atol=1e-12)


def test_analytic_kl_matches_monte_carlo_within_its_standard_error() -> None:
    torch.manual_seed(0)
    prior = GaussianPrior(3).double()
    mu = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    logvar = torch.tensor([[-1.0, 0.5, 0.0], [0.3, -0.2, 0.1]], dtype=torch.float64)
    analytic = prior.kl(mu, logvar)
    q = Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)
    z = q.sample((200_000,))
    samples = q.log_prob(z) - prior.log_prob(z)
    mc, stderr = samples.mean(0), samples.std(0) / samples.shape[0] ** 0.5
    assert ((analytic - mc).abs() < 4 * stderr).all(), (analytic, mc, stderr)
    # and the closed form itself, for the first posterior
    expected = 0.5 * (logvar.exp() + mu.square() - 1 - logvar).sum(-1)
    torch.testing.assert_close(analytic, expected)


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


def test_wrong_output_shape_of_a_subclass_is_caught_by_the_base_class() -> None:
    class Broken(GaussianPrior):
        def _log_prob(self, z):
            return super()._log_prob(z).unsqueeze(-1)

    with pytest.raises(PriorShapeError, match=r"Broken._log_prob returned shape \(2, 1\), expected \(2,\)"):
        Broken(3).log_prob(torch.zeros(2, 3))


def test_state_dict_round_trip() -> None:
    a, b = GaussianPrior(3), GaussianPrior(3)
    b.load_state_dict(a.state_dict())
    z = torch.randn(10, 3)
    assert torch.equal(a.log_prob(z), b.log_prob(z))
    assert set(a.state_dict()) == {"mean", "logvar"}
