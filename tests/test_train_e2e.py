"""`python train.py` end to end, in a subprocess, as a user runs it."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lab.run_dir import MACHINE_KEYS

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.slow


def _run(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true"}
    cmd = [
        sys.executable,
        "train.py",
        "data=digits",
        "trainer.max_epochs=1",
        "trainer.progress=false",
        "vae.hidden_dims=[32,32]",
        f"hydra.run.dir={tmp_path}",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_train_py_leaves_metrics_and_checkpoints(tmp_path: Path) -> None:
    proc = _run(tmp_path, "logger=none")
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
    assert (tmp_path / "checkpoints" / "best.pt").is_file() and (tmp_path / "checkpoints" / "last.pt").is_file()
    assert f"run dir: {tmp_path}" in proc.stdout
    assert "best validation ELBO" in proc.stdout and "test ELBO" in proc.stdout
    # Hydra's record keeps the choices the report names priors by, not the machine's paths
    record = (tmp_path / ".hydra" / "hydra.yaml").read_text()
    runtime = yaml.safe_load(record)["hydra"]["runtime"]
    assert runtime["choices"]["prior"] == "gaussian" and not set(MACHINE_KEYS) & set(runtime)
    assert str(ROOT) not in record


def test_train_py_with_wandb_offline_leaves_a_wandb_run(tmp_path: Path) -> None:
    _run(tmp_path, "logger=wandb")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb")), "the offline run holds no data file"


@pytest.mark.parametrize(
    "override",
    [f"prior={p.stem}" for p in sorted((ROOT / "conf" / "prior").glob("*.yaml"))]
    + ["prior._target_=examples.student_t_prior.StudentTPrior"],
)
def test_every_prior_trains_one_epoch_through_train(override: str, compose, tmp_path: Path) -> None:
    # In this process: `train` is what `python train.py` calls once Hydra has composed the
    # config (the two tests above start the process); each prior's config group composes,
    # trains one epoch on the digits and is evaluated on the test split.
    from train import train

    cfg = compose(
        "data=digits",
        "trainer.max_epochs=1",
        "trainer.progress=false",
        "logger=none",
        override,
        "vae.latent_dim=4",
        "vae.hidden_dims=[32]",
        "surgery.is_samples=50",  # log p(x) is checked elsewhere; K = 500 took most of a flow's time here
        "prior.num_layers=2" if "flow" in override else "seed=0",
    )
    metrics = train(cfg, run_dir=tmp_path)
    assert metrics["epochs"] == 1 and math.isfinite(metrics["test_elbo"]) and metrics["test_elbo"] < 0
    assert (tmp_path / "checkpoints" / "best.pt").is_file() and "surgery" in metrics
