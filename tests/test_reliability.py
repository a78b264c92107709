"""A run never clobbers another, a resume agrees with its run, and every bad input is one clear line before any work."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from lab.run_dir import RunDirLock, code_version
from priors.base import Prior
from tests.conftest import MINIMAL
from train import train
from vae.checkpoint import RunDirError, load_checkpoint
from vae.model import VAE
from vae.trainer import NonFiniteLossError
from vae.validation import ConfigError

ROOT = Path(__file__).resolve().parents[1]
#: Two optimizer steps per epoch on the 1,397 training digits: tests that need epochs, not steps.
TWO_STEP_EPOCHS = ("trainer.batch_size=700",)


@pytest.fixture(scope="session")
def tiny(compose) -> Callable[..., DictConfig]:
    """`compose(*MINIMAL, *overrides)`: a small, quick run on the 8x8 digits."""
    return lambda *overrides: compose(*MINIMAL, *overrides)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


# ---- a run directory belongs to one run ----------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tiny, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    train(tiny("trainer.max_steps=2"), run_dir=run_dir)
    return run_dir


@pytest.mark.slow
def test_a_fresh_run_into_a_used_directory_is_refused_and_changes_nothing(tiny, finished_run):
    before = snapshot(finished_run)
    with pytest.raises(RunDirError, match=r"already holds a run.*trainer.resume=true.*another directory"):
        train(tiny("trainer.max_epochs=2"), run_dir=finished_run)
    assert snapshot(finished_run) == before


def test_a_resume_that_changes_the_optimizer_is_refused_and_changes_nothing(tiny, finished_run):
    before = snapshot(finished_run)
    with pytest.raises(RunDirError, match=r"trainer.optimizer.lr: 0.001 -> 0.01"):
        train(tiny("trainer.max_epochs=3", "trainer.resume=true", "trainer.optimizer.lr=0.01"), run_dir=finished_run)
    with pytest.raises(RunDirError, match=r"prior._target_: 'priors.gaussian.GaussianPrior' -> 'priors.mixture"):
        train(tiny("trainer.max_epochs=3", "trainer.resume=true", "prior=mixture"), run_dir=finished_run)
    assert snapshot(finished_run) == before


@pytest.mark.slow
def test_a_resume_may_train_longer_and_records_it(tiny, tmp_path):
    train(tiny("trainer.max_epochs=1", *TWO_STEP_EPOCHS), run_dir=tmp_path)
    metrics = train(tiny("trainer.max_epochs=2", "trainer.resume=true", *TWO_STEP_EPOCHS), run_dir=tmp_path)
    assert metrics["epochs"] == 2
    (record,) = [json.loads(line) for line in (tmp_path / "resumes.jsonl").read_text().splitlines()]
    assert record["step"] == 2 and record["changed"] == {"trainer.max_epochs": [1, 2]}
    # each process that trained says with which code, from which step
    starts = [json.loads(line) for line in (tmp_path / "code.jsonl").read_text().splitlines()]
    assert [s["step"] for s in starts] == [0, 2]
    assert all({k: s[k] for k in code_version()} == code_version() for s in starts)
    stored = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["config"]
    assert stored["trainer"]["max_epochs"] == 2


@pytest.mark.slow
def test_a_stale_best_checkpoint_is_never_evaluated_as_the_best(tiny, tmp_path):
    # A run continued from a copy of last.pt alone keeps an older best.pt beside it.
    best, last = tmp_path / "checkpoints" / "best.pt", tmp_path / "checkpoints" / "last.pt"
    train(tiny("trainer.max_epochs=1", *TWO_STEP_EPOCHS), run_dir=tmp_path)
    stale = best.read_bytes()
    metrics = train(tiny("trainer.max_epochs=3", "trainer.resume=true", *TWO_STEP_EPOCHS), run_dir=tmp_path)
    assert metrics["best_epoch"] == 3  # the tiny model still improves, so best.pt moved on
    # last.pt is the best state itself (marked so): the resume writes best.pt from it again.
    best.write_bytes(stale)
    again = train(tiny("trainer.max_epochs=3", "trainer.resume=true", *TWO_STEP_EPOCHS), run_dir=tmp_path)
    assert again["best_epoch"] == 3 and load_checkpoint(best)["state"]["best_epoch"] == 3
    # last.pt not the best: a stale best.pt is never evaluated as the best.
    payload = load_checkpoint(last)
    torch.save({**payload, "is_best": False}, last)
    best.write_bytes(stale)
    expected = r"holds epoch 1, but the best validation ELBO was at epoch 3"
    with pytest.raises(ValueError, match=expected):
        train(tiny("trainer.max_epochs=3", "trainer.resume=true", *TWO_STEP_EPOCHS), run_dir=tmp_path)


@pytest.mark.slow
def test_a_locked_directory_is_refused(tiny, tmp_path):
    with RunDirLock(tmp_path):
        with pytest.raises(RunDirError, match=rf"in use by another run \(PID {os.getpid()}\)"):
            train(tiny("trainer.max_steps=2"), run_dir=tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()
    train(tiny("trainer.max_steps=2"), run_dir=tmp_path)  # released: the lock was never stale


@pytest.mark.slow  # starts train.py
def test_two_runs_started_together_in_one_directory(tmp_path):
    run_dir = tmp_path / "shared"
    cmd = [sys.executable, "train.py", *MINIMAL, "trainer.max_epochs=3", f"hydra.run.dir={run_dir}"]
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "in use by another run" in loser or "already holds a run" in loser
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]  # one run's metrics, not two interleaved


def test_default_run_directories_are_unique(compose):
    a, b = (compose(hydra=True) for _ in range(2))
    da, db = str(a.hydra.run.dir), str(b.hydra.run.dir)
    assert re.fullmatch(r"outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d-[0-9a-f]{6}", da), da
    assert da != db


# ---- bad input: one clear error before any work ------------------------------------------


#: Options train.py refuses before any work, and what the refusal says.
BAD_OPTIONS = [
    (["trainer.max_steps=-5"], "trainer.max_steps must be a positive integer or null, got -5"),
    (["data.n_val=0"], "data.n_val must be a positive integer, got 0"),
    (["data.n_val=5000"], "leaves fewer than 2 of the 1797 digits for training"),
    (["surgery.split=nope"], "surgery.split must be one of train, val, test; got 'nope'"),
    (["surgery.is_samples=-1"], "surgery.is_samples must be a positive integer, or null to skip"),
    (["surgery.is_samples=0"], "surgery.is_samples must be a positive integer, or null to skip"),
    (["surgery.is_points=0"], "surgery.is_points must be a positive integer or null, got 0"),
    (["surgery.is_points=500"], "surgery.is_points=500 but the test split has 200 points"),
    (["surgery.dimwise_samples=0"], "surgery.dimwise_samples must be a positive integer or null"),
    (["surgery.n_samples=abc"], "surgery.n_samples must be a positive integer or null, got 'abc'"),
    (["trainer.eval_batch_size=0"], "trainer.eval_batch_size must be a positive integer"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps must be a positive integer"),
    (["trainer.batch_size=1.5"], "trainer.batch_size must be a positive integer, got 1.5"),
    (["trainer.optimizer.lr=-1"], "trainer.optimizer: Invalid learning rate: -1"),
    (["seed=-1"], "seed must be an integer >= 0, got -1"),
    (["device=gpu"], "device must be auto, cpu, cuda or cuda:N"),
    (["+foo=1"], "unknown config key(s) foo"),
    (["trainer.max_epochs=0"], "trainer.max_epochs must be a positive integer, got 0"),
    (["data.seed=-1"], "data.seed must be an integer >= 0, got -1"),
    (["data.dynamic=maybe"], "data.dynamic must be true or false, got 'maybe'"),
    (["debug=maybe"], "debug must be true or false, got 'maybe'"),
    (["vae.hidden_dims=[0]"], "vae.hidden_dims must be a non-empty list of positive integers"),
    (["trainer.max_loss_per_dim=-1"], "trainer.max_loss_per_dim must be a number > 0, got -1"),
]
#: One case of each group (the trainer, the data, the surgery, the config's keys) runs in the fast
#: tier; the whole table in the slow one.
FAST_BAD_OPTIONS = ("trainer.max_steps=-5", "data.n_val=5000", "surgery.split=nope", "+foo=1")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [case if case[0][0] in FAST_BAD_OPTIONS else pytest.param(*case, marks=pytest.mark.slow) for case in BAD_OPTIONS],
)
def test_bad_options_fail_before_any_work(tiny, tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    cfg = tiny("surgery.enabled=true", "trainer.max_epochs=1", *overrides)
    with pytest.raises((ConfigError, ValueError)) as info:
        train(cfg, run_dir=run_dir)
    assert message in str(info.value)
    assert not run_dir.exists()  # not even the lock file: a refused run leaves the directory as it was


def test_max_loss_per_dim_is_an_option_of_its_own(compose):
    # Documented as trainer.max_loss_per_dim: settable without `+`, its default in the config.
    assert compose().trainer.max_loss_per_dim == 1000.0
    assert compose("trainer.max_loss_per_dim=50").trainer.max_loss_per_dim == 50


class ForgotSuperInit(Prior):
    def __init__(self, latent_dim: int) -> None:
        self.scale = torch.nn.Parameter(torch.ones(latent_dim))  # before super().__init__


def test_a_prior_that_forgot_super_init_is_told_so(tiny, tmp_path):
    cfg = tiny(f"prior._target_={__name__}.ForgotSuperInit")
    with pytest.raises(TypeError, match=rf"{__name__}.ForgotSuperInit assigns .* before calling super\(\).__init__"):
        train(cfg, run_dir=tmp_path)


# ---- training that goes wrong stops early and says where ----------------------------------


def test_divergence_stops_within_one_logging_interval(tiny, tmp_path, monkeypatch):
    original = VAE.elbo_terms

    def diverging(self, x, index=None):
        terms = original(self, x, index)
        if self.training and diverging.calls >= 4:
            terms.reconstruction = terms.reconstruction - 5e24
        diverging.calls += self.training
        return terms

    diverging.calls = 0
    monkeypatch.setattr(VAE, "elbo_terms", diverging)
    # checked every 2 steps and at the end of each 4-step epoch: steps 5-6 (epoch 2) are one interval
    with pytest.raises(
        NonFiniteLossError, match=r"exceeded 6.4e\+04 nats .* from step 5 \(epoch 2, batch 1\) to step 6:"
    ):
        train(tiny("trainer.max_epochs=5", "trainer.batch_size=350", "trainer.log_every_n_steps=2"), run_dir=tmp_path)
    # the run's own log says why it stopped
    last = (tmp_path / "train.log").read_text().splitlines()[-1]
    assert "[ERROR] - the run stopped: NonFiniteLossError: the loss exceeded 6.4e+04 nats" in last


class Unnormalized(Prior):
    """A standard normal missing its -D/2 log(2 pi) and with 100 nats added: not a density."""

    def _log_prob(self, z):
        return -0.5 * z.square().sum(-1) + 100.0

    def _sample(self, n):
        return torch.randn(n, self.latent_dim)


def test_a_positive_elbo_on_binary_data_warns_about_the_prior(tiny, tmp_path, caplog):
    # Each epoch warns; the run then ends with an error (surgery/checks.py), not with results.
    with caplog.at_level(logging.WARNING, logger="vae.trainer"), pytest.raises(ValueError, match="impossible"):
        train(tiny("trainer.max_steps=2", f"prior._target_={__name__}.Unnormalized"), run_dir=tmp_path)
    assert any("no normalized prior can give" in r.message and "Unnormalized" in r.message for r in caplog.records)


# ---- the command line: one line, exit 2; debug=true for the traceback --------------------


@pytest.mark.slow  # starts train.py
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["surgery.split=nope"], "train.py: error: surgery.split must be one of"),
        (["trainer.optimizer.lr=-1"], "train.py: error: trainer.optimizer: Invalid learning rate: -1"),
        (["device=cuda"] if not torch.cuda.is_available() else ["device=gpu"], "train.py: error: device="),
        ([f"prior._target_={__name__}.WrongShape"], "train.py: error: WrongShape."),
    ],
)
def test_train_cli_prints_one_line(tmp_path, args, expected):
    done = subprocess.run(
        [sys.executable, "train.py", *MINIMAL, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(expected), lines
    assert "Traceback" not in done.stderr


@pytest.mark.slow  # starts train.py
def test_debug_true_shows_the_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "train.py", *MINIMAL, "surgery.split=nope", "debug=true", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and "Traceback" in done.stderr and "surgery.split must be one of" in done.stderr


@pytest.mark.slow  # starts train.py
def test_an_unwritable_run_dir_is_one_line(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the checkpoints folder goes")
    done = subprocess.run(
        [sys.executable, "train.py", *MINIMAL, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("train.py: error:")


class WrongShape(Prior):
    def _log_prob(self, z):
        return z.sum()  # a scalar, not one value per latent

    def _sample(self, n):
        return torch.randn(n, self.latent_dim)
