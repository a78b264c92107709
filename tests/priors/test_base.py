"""priors/base.py: the Prior contract's checks (shapes in and out, context, what is optional), the example
prior of examples/, and the contract suite run on a user's prior."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import distributions as dist

from examples.student_t_prior import StudentTPrior
from priors.aggregate import AggregatePosteriorPrior
from priors.base import Prior, PriorShapeError
from priors.flow import FlowPrior
from priors.gaussian import GaussianPrior
from priors.mixture import MixturePrior
from vae.model import VAE

ROOT = Path(__file__).resolve().parents[2]
F64 = torch.float64


@pytest.mark.parametrize("prior", [MixturePrior(3, 2), FlowPrior(3, 1, 8), StudentTPrior(3)], ids=type)
def test_latent_size_mismatch(prior: Prior) -> None:
    with pytest.raises(PriorShapeError, match=rf"{type(prior).__name__}.log_prob expects z of shape \[..., 3\]"):
        prior.log_prob(torch.zeros(4, 2))
    with pytest.raises(ValueError, match=rf"{type(prior).__name__} has latent_dim=3 but the VAE has latent_dim=2"):
        VAE.mlp(data_dim=5, latent_dim=2, hidden_dims=[4], prior=prior)


def test_wrong_output_shape_caught_by_base_class() -> None:
    class BadPrior(Prior):
        def _log_prob(self, z):
            return z.sum(-1, keepdim=True)

        def _sample(self, n):
            return torch.zeros(n, self.latent_dim + 1)

    bad = BadPrior(2)
    with pytest.raises(PriorShapeError, match=r"BadPrior._log_prob returned shape \(4, 1\), expected \(4,\)"):
        bad.log_prob(torch.zeros(4, 2))
    with pytest.raises(PriorShapeError, match=r"BadPrior._sample returned shape \(3, 3\), expected \(3, 2\)"):
        bad.sample(3)


class Broken(GaussianPrior):
    def _log_prob(self, z):
        return super()._log_prob(z).unsqueeze(-1)

    def _kl(self, mu, logvar):
        return super()._kl(mu, logvar)[:1]

    def _log_prob_per_dim(self, z):
        return super()._log_prob_per_dim(z).sum(-1)


def test_a_subclass_returning_the_wrong_shape_is_caught_for_every_method() -> None:
    prior, z = Broken(3), torch.zeros(2, 3)
    with pytest.raises(PriorShapeError, match=r"Broken._log_prob returned shape \(2, 1\), expected \(2,\)"):
        prior.log_prob(z)
    with pytest.raises(PriorShapeError, match=r"Broken._kl returned shape \(1,\), expected \(2,\)"):
        prior.kl(z, z)
    with pytest.raises(PriorShapeError, match=r"Broken._log_prob_per_dim returned shape \(2,\), expected \(2, 3\)"):
        prior.log_prob_per_dim(z)


def test_what_a_prior_need_not_have_says_so() -> None:
    p = MixturePrior(2, num_components=3)
    assert not p.has_analytic_kl and not p.is_factorized
    with pytest.raises(NotImplementedError, match="MixturePrior has no analytic KL; use a Monte Carlo estimate"):
        p.kl(torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(NotImplementedError, match="MixturePrior is not factorized"):
        p.log_prob_per_dim(torch.zeros(1, 2))


@pytest.mark.parametrize("latent_dim", [0, -1, 2.5])
def test_a_latent_size_that_is_not_a_positive_integer_is_refused(latent_dim) -> None:
    with pytest.raises(ValueError, match=rf"GaussianPrior: latent_dim must be a positive integer, got {latent_dim}"):
        GaussianPrior(latent_dim)


def test_sample_takes_a_non_negative_integer() -> None:
    assert GaussianPrior(2).sample(0).shape == (0, 2) and GaussianPrior(2).sample(3.0).shape == (3, 2)
    for n in (-1, 1.5):
        with pytest.raises(ValueError, match=rf"GaussianPrior.sample expects a non-negative integer n, got {n}"):
            GaussianPrior(2).sample(n)
    with pytest.raises(PriorShapeError, match=r"GaussianPrior.log_prob expects z of shape \[\.\.\., 2\].*got list"):
        GaussianPrior(2).log_prob([0.0, 0.0])


class Conditioned(GaussianPrior):
    def _log_prob(self, z, context=None):
        return super()._log_prob(z) + (0.0 if context is None else context.to(z.dtype))


def test_a_context_reaches_only_a_prior_that_takes_one() -> None:
    assert Conditioned.takes_context and not GaussianPrior.takes_context
    z = torch.zeros(3, 2, dtype=F64)
    torch.testing.assert_close(
        Conditioned(2).log_prob(z, context=torch.arange(3)) - GaussianPrior(2).log_prob(z),
        torch.arange(3, dtype=F64),
    )


def test_a_prior_without_context_ignores_it_and_a_wrong_context_shape_is_named() -> None:
    z = torch.randn(4, 3)
    t = StudentTPrior(3)  # implements _log_prob(z) only
    torch.testing.assert_close(t.log_prob(z, context=torch.arange(4)), t.log_prob(z))
    q = AggregatePosteriorPrior(3).double()
    q.update_encodings(torch.randn(5, 3, dtype=F64), torch.zeros(5, 3, dtype=F64))
    with pytest.raises(PriorShapeError, match=r"AggregatePosteriorPrior.log_prob expects a context of shape \(4,\)"):
        q.log_prob(z.double(), context=torch.arange(3))


def test_student_t_matches_torch() -> None:
    p = StudentTPrior(3, df=3.0, scale=2.0).double()
    z = torch.randn(5, 3, dtype=F64) * 3
    ref = dist.StudentT(torch.tensor(3.0, dtype=F64), 0.0, torch.tensor(2.0, dtype=F64)).log_prob(z).sum(-1)
    # log_df and log_scale start as float32 logs, so nu and s are exact only to ~1e-7.
    torch.testing.assert_close(p.log_prob(z), ref, rtol=1e-7, atol=1e-7)
    fixed = StudentTPrior(3, learn_df=False, learn_scale=False)
    assert len(list(fixed.parameters())) == 0 and "log_df" in fixed.state_dict()


# ---- the contract suite on a user's prior (a pytest process each) ------------------------------


def _run(args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def _contract_suite(prior: str, tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`pytest tests/priors/test_prior_contract.py --prior PRIOR`, on that prior's cases only."""
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/priors/test_prior_contract.py", "--prior", prior]
    return _run([*args, "-k", prior.rpartition(".")[2]], tmp_path, env)


@pytest.mark.slow
def test_contract_suite_runs_on_a_user_prior(tmp_path: Path) -> None:
    r = _contract_suite("examples.student_t_prior.StudentTPrior", tmp_path)
    # pytest exits 0 only when tests ran and none failed (5: none collected, 1: a failure).
    assert r.returncode == 0, r.stdout[-3000:]


@pytest.mark.slow
def test_contract_suite_fails_a_user_prior_whose_log_prob_is_off_by_a_constant(tmp_path: Path) -> None:
    (tmp_path / "off_by_a_constant.py").write_text(
        "from priors.gaussian import GaussianPrior\n\n\n"
        "class OffByAConstant(GaussianPrior):\n"
        "    is_factorized = False  # no per-dimension densities to disagree with\n\n"
        "    def _log_prob(self, z):\n"
        "        return super()._log_prob(z) + 1e-4\n"
    )
    path = [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    r = _contract_suite("off_by_a_constant.OffByAConstant", tmp_path, env)
    assert r.returncode == 1, r.stdout[-3000:]  # 1: tests ran and some failed
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED ")]
    assert failed and all("::test_normalized[" in line for line in failed), r.stdout[-3000:]
