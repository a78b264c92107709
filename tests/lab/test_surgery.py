"""`python -m surgery` and the train.py hook: files, numbers, and clear errors for bad input."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lab import report as rep
from lab import surgery as surgery_cli
from lab.checkpoint import load_model
from lab.surgery import CLI_KEYS, SurgeryOptions, surgery_main
from surgery.decomposition import ImportanceState
from train import train
from vae import DeviceError
from vae.trainer import evaluate

ROOT = Path(__file__).resolve().parents[2]
FIELDS = [
    "split",
    "n_points",
    "n_samples",
    "elbo",
    "reconstruction",
    "avg_kl",
    "mutual_info",
    "marginal_kl",
    "log_n",
    "total_correlation",
    "dimwise_kl",
    "prior_mismatch_remainder",
    "optimal_prior_elbo",
    "log_likelihood",
    "is_samples",
]


@pytest.fixture(scope="module")
def trained_run(compose, tmp_path_factory):
    """A run trained for 20 epochs (280 steps), for the slow tests that check numbers; the fast ones
    take the two-step `short_run` of conftest.py."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose(
        "data=digits",
        "logger=none",
        "vae.latent_dim=2",
        "vae.hidden_dims=[32]",
        # 20 epochs (a few seconds) leave informative posteriors: MI and marginal KL near 0.9 nats,
        # so the checks of the numbers below have something to check (one epoch: both ~0.02).
        "trainer.max_epochs=20",
        "trainer.progress=false",
        "device=cpu",
        "surgery.is_samples=20",
        "surgery.is_points=50",
        "surgery.plot_grid=30",
    )
    metrics = train(cfg, run_dir=run_dir)
    return run_dir, metrics


def test_train_writes_surgery_json_and_pictures(short_run):
    run_dir, metrics = short_run
    report = json.loads((run_dir / "surgery.json").read_text())
    for field in FIELDS:
        assert field in report, field
        if field not in ("split", "n_points", "n_samples", "log_n", "is_samples"):
            assert field + "_stderr" in report, field
    assert report["split"] == "train" and report["n_points"] == 1397 and report["is_samples"] == 20
    assert report["prior_factorized"] and report["dimwise_kl"] == report["prior_mismatch_remainder"]
    assert (run_dir / "surgery_decomposition.png").stat().st_size > 0
    assert (run_dir / "surgery_aggregate_posterior.png").stat().st_size > 0
    for picture in ("samples.png", "reconstructions.png"):  # what the run generates, for every run
        assert (run_dir / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
    assert "ELBO surgery" in metrics["surgery_table"]
    per_point = np.load(run_dir / "log_px_test.npy")
    assert per_point.shape == (50,) and per_point.dtype == np.float64
    assert per_point.mean() == pytest.approx(report["log_likelihood"], abs=1e-9)


def test_cli_rebuilds_the_model_and_reproduces_the_numbers(compose, short_run, tmp_path):
    run_dir, _ = short_run
    cfg = compose(
        f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}",
        "device=cpu",
        "is_samples=20",
        "is_points=50",
        f"output_dir={tmp_path}",
        "plots=false",
        config="surgery_cli",
    )
    report, files = surgery_main(cfg)
    saved = json.loads((run_dir / "surgery.json").read_text())
    for field in ("elbo", "mutual_info", "marginal_kl", "total_correlation", "log_likelihood"):
        assert getattr(report, field).value == pytest.approx(saved[field], abs=1e-9), field
    assert files["json"] == tmp_path / "surgery.json"
    # The output directory of its own is a run dir the report reads, with the checkpoint's config.
    (row,) = rep.build_report([tmp_path]).rows
    assert row.latent_dim == saved["latent_dim"] and row.log_px is not None


def independent_terms(model, x, seed):
    """Per-point terms of the surgery recomputed by textbook formulas in float64, at draws of a stream
    of their own: the Bernoulli log-likelihood, the Gaussian KL, and log q(z) from the whole N x N
    matrix of log q(z_m|x_n) (no mixture kernel). Returns name -> per-point tensor `[N]`."""
    model = model.double().eval()
    x = x.double()
    with torch.no_grad():
        mu, logvar = model.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=torch.Generator().manual_seed(seed)).double()
        logits = model.decode(z)
    n, d = mu.shape
    recon = (x * F.logsigmoid(logits) + (1 - x) * F.logsigmoid(-logits)).sum(-1)
    kl = 0.5 * (logvar.exp() + mu**2 - 1 - logvar).sum(-1)
    # log N(z_m; mu_n, diag(exp(logvar_n))) per dimension, [M, N, D]
    per_dim = -0.5 * (math.log(2 * math.pi) + logvar[None] + (z[:, None] - mu[None]) ** 2 / logvar.exp()[None])
    log_q_given_x = per_dim.sum(-1).diagonal()
    log_q = torch.logsumexp(per_dim.sum(-1), dim=1) - math.log(n)
    log_q_dims = torch.logsumexp(per_dim, dim=1) - math.log(n)  # [M, D]
    log_p = -0.5 * (d * math.log(2 * math.pi) + (z**2).sum(-1))  # N(0, I)
    return {
        "reconstruction": recon,
        "avg_kl": kl,
        "elbo": recon - kl,
        "mutual_info": log_q_given_x - log_q,
        "marginal_kl": log_q - log_p,
        "total_correlation": log_q - log_q_dims.sum(-1),
        "prior_mismatch_remainder": log_q_dims.sum(-1) - log_p,
        "optimal_prior_elbo": recon - kl + log_q - log_p,
    }


def mean_stderr(values):
    return float(values.mean()), float(values.std(unbiased=True) / math.sqrt(values.numel()))


@pytest.mark.slow  # needs a trained model: trained_run trains 280 steps
def test_surgery_json_agrees_with_independent_estimates(trained_run):
    """Every number of surgery.json against a separate computation at independent samples, within
    four standard errors of the difference (exact terms to float32 precision)."""
    run_dir, _ = trained_run
    saved = json.loads((run_dir / "surgery.json").read_text())
    model, data, _ = load_model(run_dir / "checkpoints" / "best.pt")
    x = data.split("train")
    ref = independent_terms(model, x, seed=12345)

    # The average KL is analytic for the Gaussian prior: exact, no sampling.
    assert saved["avg_kl_analytic"] and saved["avg_kl_stderr"] == 0
    assert saved["avg_kl"] == pytest.approx(float(ref["avg_kl"].mean()), abs=1e-4)
    for name in (
        "reconstruction",
        "elbo",
        "mutual_info",
        "marginal_kl",
        "total_correlation",
        "prior_mismatch_remainder",
        "optimal_prior_elbo",
    ):
        value, stderr = mean_stderr(ref[name])
        assert abs(saved[name] - value) <= 4 * math.hypot(saved[name + "_stderr"], stderr), (name, saved[name], value)
    assert saved["dimwise_kl"] == saved["prior_mismatch_remainder"]  # N(0, I) factorizes

    # The trainer's own one-sample ELBO (its code path and noise) agrees too; its stderr is the reference's.
    trainer_elbo = evaluate(model.float(), x, seed=7).elbo
    _, ref_stderr = mean_stderr(ref["elbo"])
    assert abs(saved["elbo"] - trainer_elbo) <= 4 * math.hypot(saved["elbo_stderr"], ref_stderr)

    # 0 <= MI <= log N: the upper bound holds sample by sample (q(z) >= q(z|x_n) / N), the lower in expectation.
    assert saved["log_n"] == pytest.approx(math.log(1397), abs=1e-12)
    assert -3 * saved["mutual_info_stderr"] <= saved["mutual_info"] <= saved["log_n"] + 1e-9

    # average KL = MI + marginal KL: the analytic KL against two Monte Carlo estimates made separately.
    # The stderr of their sum is at most the sum of their stderrs, whatever their correlation.
    gap = saved["avg_kl"] - (saved["mutual_info"] + saved["marginal_kl"])
    assert abs(gap) <= 4 * (saved["mutual_info_stderr"] + saved["marginal_kl_stderr"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_says_so(compose, short_run):
    run_dir, _ = short_run
    cfg = compose(f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", "device=cuda", config="surgery_cli")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        surgery_main(cfg)


@pytest.mark.slow
def test_surgery_can_be_disabled_in_training(compose, tmp_path):
    cfg = compose(
        "data=digits",
        "logger=none",
        "trainer.max_steps=2",
        "trainer.max_epochs=1",
        "trainer.progress=false",
        "device=cpu",
        "surgery.enabled=false",
    )
    metrics = train(cfg, run_dir=tmp_path)
    assert "surgery" not in metrics and not (tmp_path / "surgery.json").exists()


@pytest.mark.slow
def test_cli_end_to_end_in_a_subprocess(trained_run):
    run_dir, _ = trained_run
    ckpt = run_dir / "checkpoints" / "best.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "surgery",
            f"checkpoint={ckpt}",
            "device=cpu",
            "is_samples=50",
            "is_points=100",
            "split=test",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "ELBO surgery on the test split" in done.stdout
    report = json.loads((run_dir / "surgery_test.json").read_text())
    assert report["split"] == "test" and report["n_points"] == 200
    bad = subprocess.run(
        [sys.executable, "-m", "surgery", "checkpoint=/nonexistent.pt"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_every_cli_option_is_either_a_surgery_option_or_the_clis_own(compose):
    cfg = compose("checkpoint=run/checkpoints/best.pt", "data_path=mnist.pkl.gz", config="surgery_cli")
    options = SurgeryOptions.from_config(cfg, ignore=CLI_KEYS)  # an unknown key raises
    assert options.is_samples == cfg.is_samples


def test_a_stopped_log_px_pass_continues_from_its_file_to_the_same_values(
    compose, short_run, tmp_path, monkeypatch, caplog
):
    run_dir, _ = short_run
    options = (
        f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}",
        "device=cpu",
        "is_samples=20",
        "is_points=30",
        "is_batch_elements=640",  # 10 samples a decoder call on 64 pixels: one point a batch, 30 batches
        "plots=false",
    )
    unstopped, _ = surgery_main(compose(*options, f"output_dir={tmp_path / 'unstopped'}", config="surgery_cli"))
    out = tmp_path / "stopped"
    partial = out / surgery_cli.partial_log_px_name("test")
    saves = []
    save = surgery_cli.PartialLogLikelihood.save

    def save_then_stop(self, state):
        save(self, state)
        saves.append(state.done)
        if len(saves) == 7:
            raise KeyboardInterrupt  # as a stop between two batches would

    monkeypatch.setattr(surgery_cli.PartialLogLikelihood, "due", lambda self: True)
    monkeypatch.setattr(surgery_cli.PartialLogLikelihood, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        surgery_main(compose(*options, f"output_dir={out}", config="surgery_cli"))
    assert saves == list(range(1, 8)) and partial.exists() and not (out / "log_px_test.npy").exists()

    monkeypatch.setattr(surgery_cli.PartialLogLikelihood, "save", save)
    with caplog.at_level(logging.INFO, logger="lab.surgery"):
        continued, _ = surgery_main(compose(*options, f"output_dir={out}", config="surgery_cli"))
    # the file's name only: a run's train.log, committed with it, names no machine's path
    assert "log p(x): continuing from log_px_test.partial.pt, 7 points done" in caplog.messages
    np.testing.assert_array_equal(np.load(out / "log_px_test.npy"), np.load(tmp_path / "unstopped" / "log_px_test.npy"))
    assert continued.log_likelihood == unstopped.log_likelihood
    assert not partial.exists()  # gone once log p(x) is written


def partial_state(key="k", done=3):
    return ImportanceState(key, torch.arange(float(done), dtype=torch.float64), torch.Generator().get_state())


def test_a_saved_pass_loads_only_under_its_own_key(tmp_path, caplog):
    store = surgery_cli.PartialLogLikelihood(tmp_path / "log_px_test.partial.pt")
    assert store.load("k") is None and caplog.messages == []  # nothing saved: quietly none
    store.save(partial_state())
    loaded = store.load("k")
    assert loaded.key == "k" and torch.equal(loaded.values, partial_state().values)
    assert torch.equal(loaded.generator_state, partial_state().generator_state)
    with caplog.at_level(logging.WARNING, logger="lab.surgery"):
        assert store.load("another") is None
    assert "the progress of another pass" in caplog.text and "starts over" in caplog.text


@pytest.mark.parametrize(
    "content",
    [
        b"not a torch file",
        {"key": "k", "values": torch.zeros(3)},
        {
            "key": "k",
            "values": torch.zeros(3, 2, dtype=torch.float64),
            "generator_state": torch.Generator().get_state(),
        },
    ],
    ids=["garbage", "a key missing", "values of the wrong shape"],
)
def test_a_file_that_is_not_a_saved_pass_is_set_aside(tmp_path, caplog, content):
    path = tmp_path / "log_px_test.partial.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with caplog.at_level(logging.WARNING, logger="lab.surgery"):
        assert surgery_cli.PartialLogLikelihood(path).load("k") is None
    assert "the pass starts over" in caplog.text


class Touch:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_saved_pass_never_runs_code(tmp_path, caplog):
    path, marker = tmp_path / "log_px_test.partial.pt", tmp_path / "ran"
    torch.save({"key": "k", "values": Touch(marker)}, path)  # loading it without weights_only would touch `marker`
    with caplog.at_level(logging.WARNING, logger="lab.surgery"):
        assert surgery_cli.PartialLogLikelihood(path).load("k") is None
    assert not marker.exists() and "does not load" in caplog.text
