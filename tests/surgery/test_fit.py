"""`python -m priors.fit`: a prior fitted to a frozen VAE, and the exact accounting of what it wins."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from priors.mixture import MixturePrior
from surgery import report as rep
from surgery.fit import FitOptions, fit_main, fit_prior
from train import train
from vae.checkpoint import load_model
from vae.validation import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(compose, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose(
        "data=digits",
        "logger=none",
        "device=cpu",
        "vae.latent_dim=3",
        "vae.hidden_dims=[32]",
        "trainer.max_epochs=15",
        "trainer.progress=false",
        "surgery.enabled=false",
    )
    train(cfg, run_dir=run_dir)
    return run_dir / "checkpoints" / "best.pt"


def fit_cfg(compose, checkpoint: Path, out_dir: Path, *overrides: str):
    return compose(
        f"checkpoint={checkpoint}",
        f"out_dir={out_dir}",
        "device=cpu",
        "fit.progress=false",
        "fit.max_epochs=40",
        "surgery.is_samples=20",
        *overrides,
        config="fit",
    )


@pytest.mark.parametrize("prior", ["mixture", "flow"])
def test_the_elbo_gain_is_the_marginal_kl_reduction(compose, trained, tmp_path, prior):
    extra = ["prior.num_components=10"] if prior == "mixture" else ["prior.num_layers=2", "prior.hidden_features=16"]
    out_dir, result = fit_main(fit_cfg(compose, trained, tmp_path / "fit", f"prior={prior}", *extra))
    for split in ("train", "test"):
        r = result[split]
        assert r["mutual_info_after"] == r["mutual_info_before"]  # the encoder did not move
        assert abs(r["identity_gap"]) <= 3 * r["identity_gap_stderr"] + 1e-9, r
        assert r["elbo_gain"] == pytest.approx(r["elbo_after"] - r["elbo_before"])
    assert result["train"]["marginal_kl_after"] < result["train"]["marginal_kl_before"]  # it fitted something
    assert result["fit"]["epochs"] >= 1 and len(result["curve"]) == result["fit"]["epochs"]
    # The new run dir holds a checkpoint of the same networks with the new prior.
    old, _, _ = load_model(trained)
    new, _, cfg = load_model(out_dir / "checkpoints" / "best.pt")
    assert cfg.prior._target_.endswith(("MixturePrior", "FlowPrior"))
    for key, value in old.state_dict().items():
        if not key.startswith("prior."):
            assert torch.equal(new.state_dict()[key], value), key
    for name in (
        "surgery.json",
        "surgery_test.json",
        "log_px_test.npy",
        "samples.png",
        "reconstructions.png",
        "fit.json",
    ):
        assert (out_dir / name).is_file(), name


def test_a_crash_after_the_fit_keeps_the_fitted_prior_and_the_log_shows_the_fit(
    compose, trained, tmp_path, monkeypatch, caplog
):
    import surgery.fit as fit_module

    calls = []
    surgeries = fit_module._surgeries

    def crash_on_the_second(*args, **kwargs):  # the surgery before the fit runs, the one after fails
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return surgeries(*args, **kwargs)

    monkeypatch.setattr(fit_module, "_surgeries", crash_on_the_second)
    cfg = fit_cfg(compose, trained, tmp_path / "fit", "prior=mixture", "prior.num_components=10", "fit.max_epochs=3")
    with caplog.at_level("INFO", logger="surgery.fit"), pytest.raises(RuntimeError, match="killed"):
        fit_main(cfg)
    model, _, config = load_model(tmp_path / "fit" / "checkpoints" / "best.pt")
    assert isinstance(model.prior, MixturePrior) and config.prior._target_.endswith("MixturePrior")
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fit epoch")]
    assert len(epochs) == 3 and epochs[0].startswith("fit epoch 1: train log p(z)")


def test_the_exact_aggregate_posterior_closes_everything_without_fitting(compose, trained, tmp_path):
    _, result = fit_main(fit_cfg(compose, trained, tmp_path / "fit", "prior=aggregate"))
    assert result["fit"] is None
    r = result["train"]
    assert abs(r["marginal_kl_after"]) < 1e-6 and r["share_closed"] == pytest.approx(1.0, abs=1e-5)
    assert abs(r["identity_gap"]) <= 3 * r["identity_gap_stderr"] + 1e-9


def test_fit_prior_recovers_an_analytic_aggregate_posterior():
    # Every posterior is N(m, s^2 I): q(z) is that Gaussian, and a one-component mixture can be it.
    torch.manual_seed(0)
    m, log_s2 = torch.tensor([1.5, -2.0]), torch.tensor([-0.5, 0.3])
    posteriors = (m.expand(10_000, 2).clone(), log_s2.expand(10_000, 2).clone())
    prior = MixturePrior(2, num_components=1)
    history = fit_prior(
        prior,
        posteriors,
        (m.expand(5000, 2).clone(), log_s2.expand(5000, 2).clone()),
        FitOptions(lr=0.02, batch_size=1000, max_epochs=100, patience=15, progress=False),
    )
    torch.testing.assert_close(prior.means[0].detach(), m, atol=0.05, rtol=0)
    torch.testing.assert_close(prior.logvars[0].detach(), log_s2, atol=0.1, rtol=0)
    entropy = 0.5 * (2 * math.log(2 * math.pi * math.e) + float(log_s2.sum()))
    assert history.best_val_log_prior == pytest.approx(-entropy, abs=0.05)  # E_q log p = -H(q) at p = q


def test_fit_prior_stops_at_its_time_budget_with_the_best_state():
    torch.manual_seed(0)
    posteriors = (torch.randn(2000, 2), torch.zeros(2000, 2))
    prior = MixturePrior(2, num_components=4)
    options = FitOptions(lr=0.01, batch_size=500, max_epochs=10_000, patience=10_000, progress=False, max_seconds=1e-9)
    history = fit_prior(prior, posteriors, posteriors, options)
    assert history.epochs == 1 and history.best_epoch == 1  # one epoch, then the budget is spent
    with pytest.raises(ConfigError, match="fit.max_seconds"):
        FitOptions(lr=0.01, batch_size=1, max_epochs=1, patience=1, progress=False, max_seconds=0)


def test_fit_prior_takes_each_epochs_posteriors_from_a_function():
    torch.manual_seed(0)
    m = torch.tensor([1.5, -2.0])
    epochs = []

    def posteriors(epoch):  # a fresh draw around m each epoch, like a fresh binarization
        epochs.append(epoch)
        return m + 0.1 * torch.randn(4000, 2), torch.full((4000, 2), -1.0)

    prior = MixturePrior(2, num_components=1)
    options = FitOptions(lr=0.02, batch_size=1000, max_epochs=60, patience=60, progress=False)
    history = fit_prior(prior, posteriors, posteriors(0), options)
    assert epochs[1:] == list(range(1, history.epochs + 1))  # once an epoch, numbered from 1
    torch.testing.assert_close(prior.means[0].detach(), m, atol=0.05, rtol=0)


def test_rebinarize_fits_to_fresh_draws_and_keeps_the_identity(compose, trained, tmp_path):
    cfg = fit_cfg(compose, trained, tmp_path / "fit", "prior=mixture", "prior.num_components=10", "fit.rebinarize=true")
    out_dir, result = fit_main(cfg)
    assert result["fit_options"]["rebinarize"] is True
    md = rep.render_markdown(rep.build_report([out_dir]))
    assert "| MixturePrior (fresh binarizations) | GaussianPrior |" in md
    # The same prior fitted the default way is a row of its own, not a second seed of this one.
    plain, _ = fit_main(fit_cfg(compose, trained, tmp_path / "plain", "prior=mixture", "prior.num_components=10"))
    rows = [r for r in rep.build_report([plain, out_dir]).rows if r.prior == "MixturePrior"]
    assert [r.n_runs for r in rows] == [1, 1]
    assert any("fit.rebinarize=True" in r.variant for r in rows)
    for split in ("train", "test"):
        r = result[split]
        assert abs(r["identity_gap"]) <= 3 * r["identity_gap_stderr"] + 1e-9, r
    assert result["train"]["marginal_kl_after"] < result["train"]["marginal_kl_before"]


def test_rebinarize_refuses_data_binarized_once(compose, tiny_cfg, tmp_path):
    tiny_cfg.data.dynamic = False
    tiny_cfg.trainer.max_epochs = 1
    tiny_cfg.surgery.enabled = False
    train(tiny_cfg, run_dir=tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "best.pt"
    with pytest.raises(ConfigError, match="fit.rebinarize=true needs dynamically binarized data"):
        fit_main(fit_cfg(compose, checkpoint, tmp_path / "fit", "fit.rebinarize=true"))


def test_a_users_prior_fits_and_the_report_shows_it(compose, trained, tmp_path):
    # The new prior comes from the command line (trusted); prior=gaussian is a node without extra keys.
    cfg = fit_cfg(
        compose,
        trained,
        tmp_path / "fit",
        "prior=gaussian",
        "prior._target_=examples.student_t_prior.StudentTPrior",
        "+prior.df=4.0",
    )
    out_dir, result = fit_main(cfg)
    assert result["new_prior"] == "StudentTPrior"
    report = rep.build_report([trained.parent.parent, out_dir])
    md = rep.render_markdown(report)
    assert "## Fitted after training" in md and "| StudentTPrior | GaussianPrior |" in md
    (fitted,) = [r for r in report.runs if r.fit is not None]
    assert "fitted after training=true" in fitted.settings  # its own row, never averaged with trained runs


def test_bad_fit_options_are_one_line(trained, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "priors.fit", f"checkpoint={trained}", "fit.lr=-1", f"out_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and done.stderr.strip() == "priors.fit: error: fit.lr must be a number > 0, got -1"
