"""Impossible figures (a positive ELBO or log p(x) on binary data, a negative KL) fail the run that gives them."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from priors.gaussian import GaussianPrior
from surgery.checks import ImpossibleResultError, check_run_results, impossible_figures
from train import train


class InflatedPrior(GaussianPrior):
    """N(0, I) with log_prob raised by `offset` nats: a prior that lost its normalizing constant."""

    has_analytic_kl = False  # the ELBO then sees the inflated log_prob, as a user's prior's would
    is_factorized = False

    def __init__(self, latent_dim: int, offset: float = 200.0) -> None:
        super().__init__(latent_dim)
        self.offset = offset

    def _log_prob(self, z: Tensor) -> Tensor:
        return super()._log_prob(z) + self.offset


class Splits:
    def __init__(self, x: Tensor) -> None:
        self.x = x

    def split(self, name: str) -> Tensor:
        return self.x


BINARY = Splits(torch.tensor([[0.0, 1.0], [1.0, 1.0]]))


def test_a_positive_test_elbo_on_binary_data_is_impossible() -> None:
    with pytest.raises(
        ImpossibleResultError,
        match=r"^impossible final figures: test ELBO \+71\.1 nats > 0 on data in \[0, 1\].*files in /runs/x are not",
    ):
        check_run_results({"test_elbo": 71.1, "run_dir": "/runs/x"}, BINARY)
    check_run_results({"test_elbo": -0.5}, BINARY)  # possible
    check_run_results({"test_elbo": 71.1}, Splits(torch.tensor([[0.0, 2.0]])))  # not data a Bernoulli bounds


def test_surgery_figures_are_judged_with_their_standard_errors() -> None:
    surgery = {
        "split": "train",
        "elbo": -80.0,
        "elbo_stderr": 0.1,
        "marginal_kl": -0.002,  # below 0, but within its error: no verdict
        "marginal_kl_stderr": 0.001,
        "log_likelihood": 0.01,  # above 0, within its error
        "log_likelihood_stderr": 0.01,
        "log_likelihood_split": "test",
    }
    check_run_results({"test_elbo": -80.0, "surgery": surgery}, BINARY)
    surgery |= {"marginal_kl": -13.37, "marginal_kl_stderr": 0.05, "log_likelihood": 71.2}
    with pytest.raises(ImpossibleResultError) as raised:
        check_run_results({"test_elbo": -80.0, "surgery": surgery}, BINARY)
    message = str(raised.value)
    assert "surgery marginal KL (train) -13.37 ± 0.05 nats < 0" in message and "test log p(x) +71.2" in message
    assert "\n" not in message


def test_impossible_figures_asks_about_the_data_only_for_likelihoods() -> None:
    asked = []

    def unit(name: str) -> bool:
        asked.append(name)
        return True

    found = impossible_figures(
        [("kl", -1.0, 0.01, "kl"), ("elbo", 5.0, 0.1, "elbo"), ("skip", None, None, "elbo")], unit
    )
    assert len(found) == 2 and asked == ["elbo"]


@pytest.mark.slow
def test_a_run_with_an_unnormalized_prior_ends_with_an_error(tiny_cfg, tmp_path) -> None:
    tiny_cfg.prior._target_ = f"{__name__}.InflatedPrior"
    tiny_cfg.trainer.max_epochs = 1
    tiny_cfg.surgery.is_samples = 10
    tiny_cfg.surgery.plots = False
    with pytest.raises(ImpossibleResultError, match=r"test ELBO \+\d.* > 0 on data in \[0, 1\]") as raised:
        train(tiny_cfg, run_dir=tmp_path / "run")
    assert "test log p(x) +" in str(raised.value) and "surgery marginal KL (train) -" in str(raised.value)
    assert (tmp_path / "run" / "surgery.json").is_file()  # the evidence stays, flagged as not results
