"""`python -m priors.fit`: a prior fitted to a frozen VAE with the trainer, and the exact accounting of what it wins."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lab import report as rep
from lab.checkpoint import load_model
from lab.fit import (
    FitOptions,
    FitStreams,
    _mean_log_prior,
    accounting,
    comparison,
    fit_main,
    fixed_binarization,
    summary,
    validation_draws,
)
from priors.gaussian import GaussianPrior
from priors.mixture import MixturePrior
from surgery.decomposition import Estimate
from tests.surgery.test_checks import InflatedPrior
from train import train
from vae.checkpoint import RunDirError
from vae.data import BinarizedData, digits
from vae.model import VAE
from vae.networks import MLPDecoder
from vae.trainer import load_checkpoint
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


@pytest.mark.slow
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
    assert 0 < result["test_log_likelihood_gain_stderr"] < abs(result["test_log_likelihood_before"]) / 100
    assert result["fit"]["epochs"] >= 1 and len(result["curve"]) == result["fit"]["epochs"]
    assert result["fit_options"]["train_encoder"] is False and result["frozen"] == ["encoder", "decoder"]
    assert (
        result["accounting"].startswith("encoder and decoder frozen")
        and "elbo_gain = marginal_kl_reduction" in (result["accounting"])
    )
    # The trainer's metrics, with the callback's mean log p(z) on the fixed validation draws.
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["val_log_prior"] for line in lines] == [c["val_log_prior"] for c in result["curve"]]
    best = max(lines, key=lambda line: line["val_elbo"])
    assert best["epoch"] == result["fit"]["best_epoch"] and best["val_elbo"] == result["fit"]["best_val_elbo"]
    # The old prior is compared with the new on the fixed validation draws; the restored best prior scores
    # there what the curve recorded at its epoch.
    v = result["validation"]
    assert v["measure"] == "log_prior" and v["log_prior_after"] == result["fit"]["best_val_log_prior"]
    assert v["log_prior_after"] == pytest.approx(best["val_log_prior"], abs=1e-9)
    assert v["gain"] == pytest.approx(v["log_prior_after"] - v["log_prior_before"]) and not v["worse"]
    assert result["impossible"] == [] and result["train"]["estimator_failure"] is None
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


@pytest.mark.slow
def test_a_crash_after_the_fit_keeps_the_fitted_prior_and_the_log_shows_the_fit(
    compose, trained, tmp_path, monkeypatch, caplog
):
    import lab.fit as fit_module

    calls = []
    surgeries = fit_module._surgeries

    def crash_on_the_second(*args, **kwargs):  # the surgery before the fit runs, the one after fails
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return surgeries(*args, **kwargs)

    monkeypatch.setattr(fit_module, "_surgeries", crash_on_the_second)
    cfg = fit_cfg(compose, trained, tmp_path / "fit", "prior=mixture", "prior.num_components=10", "fit.max_epochs=3")
    with caplog.at_level("INFO"), pytest.raises(RuntimeError, match="killed"):
        fit_main(cfg)
    model, _, config = load_model(tmp_path / "fit" / "checkpoints" / "best.pt")
    assert isinstance(model.prior, MixturePrior) and config.prior._target_.endswith("MixturePrior")
    epochs = [r.getMessage() for r in caplog.records if r.name == "vae.trainer" and r.getMessage().startswith("epoch")]
    assert len(epochs) == 3 and epochs[0].startswith("epoch 1: train ELBO")


@pytest.mark.slow
def test_the_exact_aggregate_posterior_closes_everything_without_fitting(compose, trained, tmp_path):
    _, result = fit_main(fit_cfg(compose, trained, tmp_path / "fit", "prior=aggregate"))
    assert result["fit"] is None
    r = result["train"]
    assert abs(r["marginal_kl_after"]) < 1e-6 and r["share_closed"] == pytest.approx(1.0, abs=1e-5)
    assert abs(r["identity_gap"]) <= 3 * r["identity_gap_stderr"] + 1e-9


class ConstantEncoder(torch.nn.Module):
    """Every input's posterior is N(m, s^2 I): the aggregate posterior q(z) is that Gaussian."""

    def __init__(self, mu: torch.Tensor, logvar: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mu", mu)
        self.register_buffer("logvar", logvar)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu.expand(len(x), -1), self.logvar.expand(len(x), -1)


@pytest.mark.slow  # 600 steps
def test_the_trainer_with_the_networks_frozen_fits_the_prior_to_q_z(tmp_path):
    # With the encoder and decoder frozen, the ELBO's gradient for the prior is that of the mean log p(z):
    # a one-component mixture trained on the ELBO becomes q(z) = N(m, s^2 I).
    torch.manual_seed(0)
    m, log_s2 = torch.tensor([1.5, -2.0]), torch.tensor([-0.5, 0.3])
    grey = {"train": torch.rand(50_000, 4), "val": torch.rand(5000, 4), "test": torch.rand(10, 4)}
    data = BinarizedData(grey, dynamic=False)  # the inputs do not matter: every posterior is the same
    model = VAE(ConstantEncoder(m, log_s2), MLPDecoder(4, 2, [4]), MixturePrior(2, num_components=1), 2)
    decoder = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    options = FitOptions(lr=0.02, batch_size=1000, max_epochs=12, patience=12, progress=False)  # 600 steps
    trainer = options.trainer(tmp_path, "cpu", seed=FitStreams.of(0).draws, callbacks=[])
    trainer.load_best(model, trainer.fit(model, data))
    torch.testing.assert_close(model.prior.means[0].detach(), m, atol=0.05, rtol=0)
    torch.testing.assert_close(model.prior.logvars[0].detach(), log_s2, atol=0.1, rtol=0)
    entropy = 0.5 * (2 * math.log(2 * math.pi * math.e) + float(log_s2.sum()))
    z_val = validation_draws((m.expand(5000, 2), log_s2.expand(5000, 2)), 0)
    assert _mean_log_prior(model.prior.eval(), z_val, 1000) == pytest.approx(-entropy, abs=0.05)  # E_q log p = -H(q)
    for key, value in model.decoder.state_dict().items():
        assert torch.equal(value, decoder[key]), key  # frozen


def test_fit_options_check_themselves_and_freeze_the_networks():
    with pytest.raises(ConfigError, match="fit.max_seconds"):
        FitOptions(lr=0.01, batch_size=1, max_epochs=1, patience=1, progress=False, max_seconds=0)
    with pytest.raises(ConfigError, match="fit.train_encoder must be true or false"):
        FitOptions(lr=0.01, batch_size=1, max_epochs=1, patience=1, progress=False, train_encoder="yes")
    options = FitOptions(lr=0.01, batch_size=7, max_epochs=3, patience=2, progress=False, max_seconds=5.0)
    trainer = options.trainer("out", "cpu", seed=1, callbacks=[])
    assert trainer.freeze == ("encoder", "decoder") and trainer.max_seconds == 5.0 and trainer.warmup_epochs == 0
    assert (trainer.batch_size, trainer.max_epochs, trainer.patience, trainer.seed) == (7, 3, 2, 1)
    assert dataclasses.replace(options, train_encoder=True).frozen == ("decoder",)
    assert dataclasses.replace(options, train_decoder=True).frozen == ("encoder",)
    both = dataclasses.replace(options, train_encoder=True, train_decoder=True)
    assert both.frozen == () and both.refits_networks and not options.refits_networks
    assert both.trainer("out", "cpu", seed=1, callbacks=[]).freeze == ()
    with pytest.raises(ConfigError, match="fit.train_decoder must be true or false"):
        dataclasses.replace(options, train_decoder=1)
    assert accounting(("encoder", "decoder")).startswith("encoder and decoder frozen")
    assert accounting(("decoder",)).startswith("encoder refitted, decoder frozen:")
    assert accounting(("encoder",)).startswith("decoder refitted, encoder frozen:")
    assert accounting(()).startswith("encoder and decoder refitted:")


def test_without_rebinarize_every_epoch_trains_on_the_surgerys_binarization():
    data = digits()
    fixed = fixed_binarization(data)
    assert torch.equal(fixed.train_epoch(3), data.split("train")) and data.dynamic  # the original is unchanged
    assert not torch.equal(data.train_epoch(3), data.split("train"))


@pytest.mark.slow
def test_an_out_dir_that_holds_a_run_is_refused_before_any_work(compose, trained, tmp_path, monkeypatch):
    import lab.fit as fit_module

    (tmp_path / "fit").mkdir()
    (tmp_path / "fit" / "metrics.jsonl").write_text("")
    monkeypatch.setattr(fit_module, "load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    with pytest.raises(RunDirError, match=r"out_dir .*fit already holds a run \(metrics.jsonl\)"):
        fit_main(fit_cfg(compose, trained, tmp_path / "fit"))


@pytest.mark.slow
def test_train_encoder_refits_the_encoder_and_keeps_the_surgerys_identity(compose, trained, tmp_path):
    cfg = fit_cfg(
        compose, trained, tmp_path / "fit", "prior=mixture", "prior.num_components=10", "fit.train_encoder=true"
    )
    out_dir, result = fit_main(cfg)
    assert result["fit_options"]["train_encoder"] is True and result["frozen"] == ["decoder"]
    assert "reconstruction change - mutual_info change + marginal_kl_reduction" in result["accounting"]
    old, _, _ = load_model(trained)
    new, _, _ = load_model(out_dir / "checkpoints" / "best.pt")
    new_state = new.state_dict()
    moved = {
        k.split(".")[0] for k, v in old.state_dict().items() if k in new_state and not torch.equal(new_state[k], v)
    }
    assert moved == {"encoder"} and isinstance(new.prior, MixturePrior)  # the decoder stayed
    for split in ("train", "test"):
        r = result[split]
        assert r["mutual_info_after"] != r["mutual_info_before"]  # the encoder moved
        explained = (
            (r["reconstruction_after"] - r["reconstruction_before"])
            - (r["mutual_info_after"] - r["mutual_info_before"])
            + r["marginal_kl_reduction"]
        )
        assert r["identity_gap"] == pytest.approx(r["elbo_gain"] - explained, abs=1e-12)
        assert abs(r["identity_gap"]) <= 3 * r["identity_gap_stderr"] + 1e-9, r
    v = result["validation"]
    assert v["measure"] == "elbo" and v["gain"] == pytest.approx(v["elbo_after"] - v["elbo_before"])
    assert result["fit"]["best_val_log_prior"] is None and "val_log_prior" not in result["curve"][0]
    lines, _ = summary(out_dir, result)
    assert "reconstruction" in lines[0] and lines[-2].startswith("validation ELBO, same noise:")
    checkpoint = load_checkpoint(out_dir / "checkpoints" / "best.pt")
    assert checkpoint["config"]["prior"]["_target_"].endswith("MixturePrior")


@pytest.mark.slow
def test_train_decoder_refits_the_decoder_and_keeps_the_surgerys_identity(compose, trained, tmp_path):
    cfg = fit_cfg(
        compose, trained, tmp_path / "fit", "prior=mixture", "prior.num_components=10", "fit.train_decoder=true"
    )
    out_dir, result = fit_main(cfg)
    assert result["frozen"] == ["encoder"] and result["accounting"].startswith("decoder refitted, encoder frozen")
    old, _, _ = load_model(trained)
    new, _, _ = load_model(out_dir / "checkpoints" / "best.pt")
    new_state = new.state_dict()
    moved = {
        k.split(".")[0] for k, v in old.state_dict().items() if k in new_state and not torch.equal(new_state[k], v)
    }
    assert moved == {"decoder"}  # the encoder stayed
    for split in ("train", "test"):
        r = result[split]
        assert r["mutual_info_after"] == pytest.approx(r["mutual_info_before"], abs=1e-12)  # same encoder, same draws
        assert r["reconstruction_after"] != r["reconstruction_before"]  # the decoder moved
        explained = (r["reconstruction_after"] - r["reconstruction_before"]) + r["marginal_kl_reduction"]
        assert r["identity_gap"] == pytest.approx(r["elbo_gain"] - explained, abs=1e-9)
        assert abs(r["identity_gap"]) <= 3 * r["identity_gap_stderr"] + 1e-9, r
    v = result["validation"]
    assert v["measure"] == "elbo" and v["gain"] == pytest.approx(v["elbo_after"] - v["elbo_before"])
    assert "val_log_prior" in result["curve"][0]  # the encoder is frozen: the fixed draws still measure the prior
    lines, _ = summary(out_dir, result)
    assert "reconstruction" in lines[0] and lines[-2].startswith("validation ELBO, same noise:")
    md = rep.render_markdown(rep.build_report([out_dir]))
    assert "| MixturePrior (decoder refitted) | GaussianPrior |" in md


@pytest.mark.slow
def test_rebinarize_fits_to_fresh_draws_and_keeps_the_identity(compose, trained, tmp_path):
    cfg = fit_cfg(compose, trained, tmp_path / "fit", "prior=mixture", "prior.num_components=10", "fit.rebinarize=true")
    out_dir, result = fit_main(cfg)
    assert result["fit_options"]["rebinarize"] is True
    md = rep.render_markdown(rep.build_report([out_dir]))
    assert "| MixturePrior (fresh binarizations) | GaussianPrior |" in md
    # The same prior fitted the default way is a row of its own, not a second seed of this one.
    plain, _ = fit_main(fit_cfg(compose, trained, tmp_path / "plain", "prior=mixture", "prior.num_components=10"))
    rows = [r for r in rep.build_report([plain, out_dir]).rows if r.prior == "mixture"]  # the option name
    assert [r.n_runs for r in rows] == [1, 1]
    assert any("fit.rebinarize=True" in r.variant for r in rows)
    for split in ("train", "test"):
        r = result[split]
        assert abs(r["identity_gap"]) <= 3 * r["identity_gap_stderr"] + 1e-9, r
    assert result["train"]["marginal_kl_after"] < result["train"]["marginal_kl_before"]


@pytest.mark.slow
def test_rebinarize_refuses_data_binarized_once(compose, tiny_cfg, tmp_path):
    tiny_cfg.data.dynamic = False
    tiny_cfg.trainer.max_epochs = 1
    tiny_cfg.surgery.enabled = False
    train(tiny_cfg, run_dir=tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "best.pt"
    with pytest.raises(ConfigError, match="fit.rebinarize=true needs dynamically binarized data"):
        fit_main(fit_cfg(compose, checkpoint, tmp_path / "fit", "fit.rebinarize=true"))


@pytest.mark.slow
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


@pytest.mark.slow
def test_bad_fit_options_are_one_line(trained, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "priors.fit", f"checkpoint={trained}", "fit.lr=-1", f"out_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and done.stderr.strip() == "priors.fit: error: fit.lr must be a number > 0, got -1"


class ShiftedPrior(GaussianPrior):
    """N(3, I): a correct prior, far from any aggregate posterior this model has."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__(latent_dim)
        self.mean.fill_(3.0)


def test_fit_streams_are_apart() -> None:
    streams = FitStreams.of(0)
    seeds = [streams.init, streams.draws, streams.prior_rng, streams.validation, streams.evaluation]
    assert len(set(seeds)) == 5 and 0 not in seeds  # none replays another, nor the bare seed
    assert FitStreams.of(0, surgery_seed=1).evaluation != streams.evaluation  # surgery.seed still varies the noise
    assert FitStreams.of(1).init != streams.init


@pytest.mark.slow
@pytest.mark.parametrize("streams", ["apart", "one seed for all, the old defect"])
def test_the_new_priors_initialization_is_not_the_surgery_noise(compose, trained, tmp_path, monkeypatch, streams):
    """The z every surgery draws (its noise eps = (z - mu) / sigma) against a fitted mixture's initial
    means: uncorrelated with the defaults. With every stream seeded alike, as before, the means were
    the first surgery noise itself, which this measurement catches (its power)."""
    import lab.fit as fit_module
    import surgery.decomposition as decomposition

    k = 200
    noise: list[torch.Tensor] = []
    draw = decomposition.reparameterize

    def recording(mu, logvar, generator=None):
        z = draw(mu, logvar, generator)
        noise.append(((z - mu) * torch.exp(-0.5 * logvar)).reshape(-1, mu.shape[-1]).detach().double())
        return z

    initial: list[torch.Tensor] = []
    build = fit_module.build_prior

    def building(*args, **kwargs):
        prior = build(*args, **kwargs)
        initial.append(prior.means.detach().clone().double())
        return prior

    monkeypatch.setattr(decomposition, "reparameterize", recording)
    monkeypatch.setattr(fit_module, "build_prior", building)
    if streams != "apart":
        monkeypatch.setattr(fit_module, "derive_seed", lambda seed, *salt: seed)
    overrides = ["prior=mixture", f"prior.num_components={k}", "fit.max_epochs=1"]
    fit_main(fit_cfg(compose, trained, tmp_path / "fit", *overrides))
    (means,) = initial
    draws = [eps[:k].flatten() for eps in noise if len(eps) >= k]
    assert len(draws) >= 4  # the ELBO draws of the train and test surgeries, before and after
    correlations = [torch.corrcoef(torch.stack([means.flatten(), eps]))[0, 1].abs().item() for eps in draws]
    if streams == "apart":
        assert max(correlations) < 0.25, correlations  # 600 numbers: chance gives about 0.04
        assert not any(torch.allclose(means.flatten(), eps, atol=1e-3) for eps in draws)
    else:
        assert max(correlations) > 0.9, correlations


def _report(kl: float, kl_stderr: float, elbo: float) -> SimpleNamespace:
    return SimpleNamespace(
        marginal_kl=Estimate(kl, kl_stderr),
        elbo=Estimate(elbo, 0.05),
        reconstruction=Estimate(-20.0, 0.05),
        identity_gap=Estimate(0.0, 0.01),
        mutual_info=Estimate(2.0, 0.001),
        log_likelihood=None,
        log_likelihood_per_point=None,
    )


def test_a_negative_marginal_kl_is_an_estimator_failure_not_a_gain(tmp_path) -> None:
    # The collapsed digits model of the issue: 0.020 -> -13.37 on the test split, an "ELBO gain" of +13.4.
    before = {"train": _report(0.020, 0.001, -30.0), "test": _report(0.020, 0.001, -31.0)}
    after = {"train": _report(0.010, 0.001, -29.99), "test": _report(-13.37, 0.05, -17.6)}
    out = comparison(before, after)
    test, train_split = out["test"], out["train"]
    assert test["share_closed"] is None and test["elbo_gain"] is None and test["marginal_kl_reduction"] is None
    assert "marginal KL after -13.37 ± 0.05 nats" in test["estimator_failure"]
    assert train_split["estimator_failure"] is None and train_split["share_closed"] == pytest.approx(0.5)
    # Below 0 within its Monte Carlo error is no failure: the exact aggregate posterior sits at 0.
    within = comparison(before, {**after, "test": _report(-0.002, 0.001, -31.0)})["test"]
    assert within["estimator_failure"] is None and within["share_closed"] == pytest.approx(1.1)
    validation = {"log_prior_before": -5.0, "log_prior_after": -4.0, "gain": 1.0, "gain_stderr": 0.01, "worse": False}
    result = {**out, "old_prior": "GaussianPrior", "new_prior": "MixturePrior", "validation": validation}
    lines, warnings = summary(tmp_path, result)
    assert lines[0].startswith("train:") and "% closed" in lines[0]
    assert "ESTIMATOR FAILURE, no gain reported" in lines[1] and "closed" not in lines[1] and "gain -" not in lines[1]
    assert warnings == []


def test_the_log_likelihood_gain_has_its_paired_standard_error(tmp_path) -> None:
    # Per-point values that differ by 1 +- a small spread, around a large spread of point
    # difficulty: the paired standard error is the spread of the differences only.
    hard = torch.linspace(-120.0, -60.0, 50, dtype=torch.float64)
    shift = 1.0 + 0.1 * torch.cos(torch.arange(50, dtype=torch.float64))
    before = {"train": _report(1.0, 0.01, -30.0), "test": _report(1.0, 0.01, -31.0)}
    after = {"train": _report(0.5, 0.01, -29.5), "test": _report(0.5, 0.01, -30.5)}
    before["train"].log_likelihood, before["train"].log_likelihood_per_point = Estimate(hard.mean().item(), 1.0), hard
    after["train"].log_likelihood = Estimate((hard + shift).mean().item(), 1.0)
    after["train"].log_likelihood_per_point = hard + shift
    out = comparison(before, after)
    assert out["test_log_likelihood_gain"] == pytest.approx(shift.mean().item())
    assert out["test_log_likelihood_gain_stderr"] == pytest.approx(shift.std().item() / math.sqrt(50))
    validation = {"log_prior_before": -5.0, "log_prior_after": -4.0, "gain": 1.0, "gain_stderr": 0.01, "worse": False}
    result = {**out, "old_prior": "GaussianPrior", "new_prior": "MixturePrior", "validation": validation}
    lines, _ = summary(tmp_path, result)
    assert any(
        line.startswith("test log p(x):") and f"+- {out['test_log_likelihood_gain_stderr']:.3f} paired" in line
        for line in lines
    )


@pytest.mark.slow
def test_a_fitted_prior_worse_than_the_one_it_replaced_is_reported(compose, trained, tmp_path) -> None:
    cfg = fit_cfg(compose, trained, tmp_path / "fit", "prior=gaussian", f"prior._target_={__name__}.ShiftedPrior")
    out_dir, result = fit_main(cfg)
    v = result["validation"]
    assert v["worse"] and v["gain"] < -1.0 and v["log_prior_after"] < v["log_prior_before"]
    assert json.loads((out_dir / "fit.json").read_text())["validation"]["worse"] is True
    lines, warnings = summary(out_dir, result)
    assert len(warnings) == 1 and warnings[0].startswith("the fitted prior is worse than the one it replaced")
    assert f"log p(z) is {-v['gain']:.3f} +- " in warnings[0] and lines[-1] == f"wrote {out_dir}"
    assert result["impossible"] == []  # worse is a valid result, not an impossible one


@pytest.mark.slow
def test_an_unnormalized_prior_is_flagged_not_reported_as_a_gain(compose, trained, tmp_path) -> None:
    target = f"{InflatedPrior.__module__}.InflatedPrior"
    out_dir, result = fit_main(
        fit_cfg(compose, trained, tmp_path / "fit", "prior=gaussian", f"prior._target_={target}")
    )
    for split in ("train", "test"):
        assert result[split]["estimator_failure"] and result[split]["share_closed"] is None
    flagged = " ".join(result["impossible"])
    assert "train ELBO after +" in flagged and "test log p(x) after +" in flagged and "marginal KL after -" in flagged
    assert "ELBO before" not in flagged  # the model's own Gaussian prior is fine
    assert json.loads((out_dir / "fit.json").read_text())["impossible"] == result["impossible"]


@pytest.mark.slow
def test_the_cli_exits_2_on_impossible_figures_and_warns_on_a_worse_prior(trained, tmp_path) -> None:
    def fit(target: str, out: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "priors.fit", f"checkpoint={trained}", "prior=gaussian"]
        command += [f"prior._target_={target}", f"out_dir={tmp_path / out}", "device=cpu", "surgery.is_samples=10"]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)

    done = fit(f"{InflatedPrior.__module__}.InflatedPrior", "inflated")
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and last.startswith("priors.fit: error: the fit's figures are impossible"), done.stderr
    assert "ESTIMATOR FAILURE" in done.stdout and (tmp_path / "inflated" / "fit.json").is_file()
    done = fit(f"{__name__}.ShiftedPrior", "shifted")
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 0 and last.startswith("priors.fit: warning: the fitted prior is worse"), done.stderr


@pytest.mark.slow
def test_warm_start_begins_from_the_checkpoints_own_prior(compose, trained, tmp_path) -> None:
    # A first fit, then a second from its checkpoint that barely moves (lr 1e-12): started from the
    # fitted mixture it scores what the first ended with on the same validation draws; a fresh
    # initialization of the same prior would be far off.
    first = ("prior=mixture", "prior.num_components=10", "fit.max_epochs=5", "surgery.is_samples=null")
    _, stage1 = fit_main(fit_cfg(compose, trained, tmp_path / "one", *first))
    fitted = tmp_path / "one" / "checkpoints" / "best.pt"
    again = (*first, "fit.max_epochs=1", "fit.lr=1e-12")
    _, warm = fit_main(fit_cfg(compose, fitted, tmp_path / "warm", *again, "fit.warm_start=true"))
    _, fresh = fit_main(fit_cfg(compose, fitted, tmp_path / "fresh", *again))
    assert warm["validation"]["log_prior_before"] == pytest.approx(stage1["validation"]["log_prior_after"], abs=1e-9)
    assert abs(warm["validation"]["gain"]) < 1e-6
    assert fresh["validation"]["gain"] < -0.01  # a fresh mixture, not the fitted one (-0.03 here)
    with pytest.raises(ConfigError, match=r"fit.warm_start=true .* the checkpoint's is .*'num_components': 10"):
        fit_main(fit_cfg(compose, fitted, tmp_path / "other", *again, "prior.num_components=7", "fit.warm_start=true"))


FIT_ARGS = ("prior=mixture", "prior.num_components=10", "fit.max_epochs=4", "fit.patience=10")


@pytest.mark.slow
def test_a_stopped_fit_resumed_gives_the_unstopped_fits_result(compose, trained, tmp_path, monkeypatch) -> None:
    import lab.fit as fit_module

    _, whole = fit_main(fit_cfg(compose, trained, tmp_path / "whole", *FIT_ARGS))

    validate = fit_module.FitCurve.on_validation_end

    def stop_in_epoch_3(self, trainer, model, data, state, record):
        if record["epoch"] == 3:
            raise KeyboardInterrupt  # a session's end: last.pt holds epoch 2
        validate(self, trainer, model, data, state, record)

    monkeypatch.setattr(fit_module.FitCurve, "on_validation_end", stop_in_epoch_3)
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        fit_main(fit_cfg(compose, trained, out, *FIT_ARGS))
    monkeypatch.undo()
    assert not (out / "fit.json").exists() and (out / "before" / "surgery_test.json").is_file()

    decompose_into, splits = fit_module.decompose_into, []

    def counted(model, data, options, *args, **kwargs):
        splits.append(options.split)
        return decompose_into(model, data, options, *args, **kwargs)

    monkeypatch.setattr(fit_module, "decompose_into", counted)
    _, resumed = fit_main(fit_cfg(compose, trained, out, *FIT_ARGS, "resume=true"))
    assert splits == ["train", "test"]  # the surgeries after the fit: those before were read back
    assert [c["epoch"] for c in resumed["curve"]] == [1, 2, 3, 4]  # the curve holds both processes' epochs
    # The same fit to the last bit: the surgeries, the paired log p(x) gain, the validation and the curve.
    assert resumed["fit"].pop("seconds") > 0 and whole["fit"].pop("seconds") > 0
    assert resumed == whole
    assert not list(out.rglob("*.partial.pt"))  # no log p(x) progress file is left behind
    for name in ("surgery.json", "surgery_test.json", "log_px_test.npy"):
        assert (out / "before" / name).is_file() and (out / name).is_file(), name
    # each of the two processes said which code it ran: the fresh one from step 0
    starts = [json.loads(line) for line in (out / "code.jsonl").read_text().splitlines()]
    assert [s["step"] for s in starts] == [0, None] and len({s["sources_sha256"] for s in starts}) == 1


@pytest.mark.slow
def test_resume_continues_only_the_same_fit_and_a_finished_one_is_read_back(
    compose, trained, tmp_path, monkeypatch
) -> None:
    import lab.fit as fit_module

    out = tmp_path / "fit"
    args = (*FIT_ARGS[:2], "fit.max_epochs=2")
    fit_main(fit_cfg(compose, trained, out, *args))
    monkeypatch.setattr(fit_module, "load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    # Finished: resume=true gives the stored result and trains nothing, even with more epochs allowed.
    _, again = fit_main(fit_cfg(compose, trained, out, *args, "resume=true", "fit.max_epochs=5"))
    assert again == json.loads((out / "fit.json").read_text())
    (out / "fit.json").unlink()  # as if it had stopped before the end
    with pytest.raises(RunDirError, match=r"holds another fit \(prior.num_components: 10 -> 12\)"):
        fit_main(fit_cfg(compose, trained, out, "prior=mixture", "prior.num_components=12", "resume=true"))
    with pytest.raises(RunDirError, match=r"holds another fit \(fit.lr: 0.001 -> 0.01\).*only fit.max_epochs"):
        fit_main(fit_cfg(compose, trained, out, *args, "fit.lr=0.01", "resume=true"))
    with pytest.raises(RunDirError, match=r"already holds a run .*or resume=true to continue the fit it holds"):
        fit_main(fit_cfg(compose, trained, out, *args))
    with pytest.raises(ConfigError, match=r"resume=true continues the fit in out_dir: give the folder"):
        fit_main(compose(f"checkpoint={trained}", "resume=true", config="fit"))
    other = tmp_path / "not_a_fit"
    other.mkdir()
    (other / "metrics.jsonl").write_text("")
    with pytest.raises(RunDirError, match=r"holds a run \(metrics.jsonl\) but no fit_request.json"):
        fit_main(fit_cfg(compose, trained, other, *args, "resume=true"))
