"""vae/model.py: the one-sample ELBO against a float64 double loop over points, pixels and latent dimensions."""

from __future__ import annotations

import math

import pytest
import torch

from priors.gaussian import GaussianPrior
from priors.mixture import MixturePrior
from vae.model import VAE

F64 = torch.float64


def log_sigmoid(v: float) -> float:
    """log sigmoid(v), stable for large |v|."""
    return -math.log1p(math.exp(-v)) if v >= 0 else v - math.log1p(math.exp(v))


def loop_log_likelihood(x: list[float], logits: list[float]) -> float:
    """sum_p x_p log sigmoid(l_p) + (1 - x_p) log sigmoid(-l_p): the Bernoulli (or continuous-Bernoulli
    cross-entropy for grey levels) log-likelihood, one pixel at a time."""
    return sum(xp * log_sigmoid(lp) + (1 - xp) * log_sigmoid(-lp) for xp, lp in zip(x, logits, strict=True))


def loop_log_normal(z: list[float], mu: list[float], logvar: list[float]) -> float:
    return sum(
        -0.5 * (math.log(2 * math.pi) + lv + (zd - md) ** 2 / math.exp(lv))
        for zd, md, lv in zip(z, mu, logvar, strict=True)
    )


def tiny_vae(prior, data_dim: int = 6) -> VAE:
    torch.manual_seed(0)
    return VAE.mlp(data_dim=data_dim, latent_dim=prior.latent_dim, hidden_dims=[5], prior=prior).double()


def draws(model: VAE, x: torch.Tensor, seed: int) -> tuple[list, list, list, list]:
    """mu, logvar, the sample z = mu + exp(logvar / 2) eps with eps from `seed`, and the decoder's logits."""
    with torch.no_grad():
        mu, logvar = model.encode(x)
        torch.manual_seed(seed)
        eps = torch.randn_like(mu)
        z = mu + torch.exp(0.5 * logvar) * eps
        logits = model.decode(z)
    return mu.tolist(), logvar.tolist(), z.tolist(), logits.tolist()


@pytest.mark.parametrize("grey", [False, True], ids=["binary", "grey levels"])
def test_elbo_with_an_analytic_kl_matches_a_double_loop(grey: bool) -> None:
    model = tiny_vae(GaussianPrior(3))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 6, generator=g, dtype=F64)
    x = x if grey else x.round()
    mu, logvar, _, logits = draws(model, x, seed=7)
    torch.manual_seed(7)
    terms = model.elbo_terms(x)
    for b in range(4):
        rec = loop_log_likelihood(x[b].tolist(), logits[b])
        kl = sum(0.5 * (m * m + math.exp(lv) - 1.0 - lv) for m, lv in zip(mu[b], logvar[b], strict=True))
        assert terms.reconstruction[b].item() == pytest.approx(rec, abs=1e-10)
        assert terms.kl[b].item() == pytest.approx(kl, abs=1e-10)
        assert terms.elbo[b].item() == pytest.approx(rec - kl, abs=1e-10)


def test_elbo_without_an_analytic_kl_is_log_q_minus_log_p_at_the_same_sample() -> None:
    prior = MixturePrior(3, num_components=4).double()
    with torch.no_grad():
        prior.means.normal_()
        prior.logits.normal_()
        prior.logvars.normal_(0, 0.3)
    model = tiny_vae(prior)
    x = torch.rand(5, 6, generator=torch.Generator().manual_seed(2), dtype=F64).round()
    mu, logvar, z, logits = draws(model, x, seed=11)
    weights = torch.softmax(prior.logits, -1).tolist()
    means, logvars = prior.means.tolist(), prior.logvars.tolist()
    torch.manual_seed(11)
    terms = model.elbo_terms(x)
    for b in range(5):
        log_p = math.log(sum(w * math.exp(loop_log_normal(z[b], means[k], logvars[k])) for k, w in enumerate(weights)))
        kl = loop_log_normal(z[b], mu[b], logvar[b]) - log_p
        assert terms.kl[b].item() == pytest.approx(kl, abs=1e-10)
        assert terms.reconstruction[b].item() == pytest.approx(loop_log_likelihood(x[b].tolist(), logits[b]), abs=1e-10)


class RecordingPrior(GaussianPrior):
    """A standard normal without an analytic KL that keeps the context it was given."""

    has_analytic_kl = False

    def _log_prob(self, z, context=None):
        self.seen = context
        return super()._log_prob(z)


def test_the_training_indices_reach_the_prior_as_its_context() -> None:
    prior = RecordingPrior(2)
    model = tiny_vae(prior)
    index = torch.tensor([4, 0, 9])
    model.elbo_terms(torch.rand(3, 6, dtype=F64), index=index)
    assert prior.seen is index
    model.elbo_terms(torch.rand(3, 6, dtype=F64))
    assert prior.seen is None


def test_log_likelihood_broadcasts_x_against_k_samples_and_stays_finite_for_large_logits() -> None:
    model = tiny_vae(GaussianPrior(2), data_dim=3)
    x = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.5, 1.0]], dtype=F64)
    logits = torch.tensor([[[60.0, -60.0, 3.0], [0.0, 1.0, -2.0]], [[-70.0, 2.0, 80.0], [5.0, 0.0, 0.0]]], dtype=F64)
    got = model.log_likelihood(x[:, None], logits)  # [B, K] from x [B, 1, P] and logits [B, K, P]
    assert got.shape == (2, 2)
    for b in range(2):
        for k in range(2):
            assert got[b, k].item() == pytest.approx(
                loop_log_likelihood(x[b].tolist(), logits[b, k].tolist()), abs=1e-12
            )


def test_a_prior_of_another_latent_size_is_refused() -> None:
    with pytest.raises(ValueError, match="GaussianPrior has latent_dim=3 but the VAE has latent_dim=2"):
        VAE.mlp(data_dim=5, latent_dim=2, hidden_dims=[4], prior=GaussianPrior(3))
    model = VAE.mlp(data_dim=5, latent_dim=3, hidden_dims=[4], prior=GaussianPrior(3))
    assert model.latent_dim == 3 and model.decode(torch.zeros(2, 7, 3)).shape == (2, 7, 5)
