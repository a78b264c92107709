"""Real tiny sweeps through `python train.py -m`: a priors x latent sizes sweep with the joblib
launcher, logged to wandb offline, and `python -m surgery.report` over it; a two-job sweep with
submitit_local (issue 5, part 7)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab import report as rep

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

PRIORS = ["gaussian", "mixture"]
LATENT_DIMS = [2, 3]

TINY = ["data=digits", "device=cpu", "trainer.max_epochs=1", "trainer.progress=false", "vae.hidden_dims=[16]"]
LAUNCHERS = {
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    "submitit_local": ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"],
}


def run_sweep(sweep_dir: Path, *overrides: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true"}
    cmd = [sys.executable, "train.py", "-m", *TINY, f"hydra.sweep.dir={sweep_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, Path]:
    """A priors x latent sizes sweep (four jobs on two loky workers, each logging to wandb offline),
    and the report over it."""
    tmp = tmp_path_factory.mktemp("joblib")
    sweep_dir = tmp / "multirun"
    run_sweep(
        sweep_dir,
        "logger=wandb",
        f"prior={','.join(PRIORS)}",
        f"vae.latent_dim={','.join(map(str, LATENT_DIMS))}",
        *LAUNCHERS["joblib"],
    )
    out = tmp / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "surgery.report", str(sweep_dir), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"table: {out / 'report.md'}" in proc.stdout
    return sweep_dir, out


def test_submitit_local_runs_each_job_in_its_own_run_dir(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "multirun"
    run_sweep(
        sweep_dir,
        "logger=none",
        "surgery.enabled=false",
        "prior=gaussian",
        "vae.latent_dim=2,3",
        *LAUNCHERS["submitit_local"],
        f"hydra.launcher.submitit_folder={tmp_path / 'submitit' / '%j'}",
    )
    runs = [rep.read_run(p) for p in rep.find_run_dirs([sweep_dir])]
    assert sorted(r.latent_dim for r in runs) == [2, 3]
    for r in runs:
        assert r.epochs == 1 and (r.path / "checkpoints" / "last.pt").is_file()


def test_sweep_runs_every_job_and_the_report_lists_it(sweep) -> None:
    sweep_dir, out = sweep
    runs = [rep.read_run(p) for p in rep.find_run_dirs([sweep_dir])]
    assert sorted((r.prior, r.latent_dim) for r in runs) == sorted((p, d) for p in PRIORS for d in LATENT_DIMS)
    for r in runs:
        assert r.epochs == 1 and (r.path / "checkpoints" / "last.pt").is_file() and r.seed == 0
    for png in ("decomposition.png", "marginal_kl.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    for r in runs:  # every run is named in the report, complete or not
        assert f"| {r.path} | {r.prior} | {r.latent_dim} | 0 | 1 | " in md  # one epoch each


def test_report_rows_hold_each_runs_surgery_values(sweep) -> None:
    sweep_dir, out = sweep
    report = rep.build_report([sweep_dir])
    assert not report.incomplete, [(r.path, r.problem) for r in report.incomplete]
    md = (out / "report.md").read_text()
    for run in report.runs:  # one seed per (prior, latent size): each row is exactly its run
        (row,) = [r for r in report.rows if (r.prior, r.latent_dim) == (run.prior, run.latent_dim)]
        assert row.n_runs == 1 and row.epochs == (run.epochs,)
        cells = []
        for key, _ in rep.COLUMNS:
            assert row.stats[key].mean == run.surgery[key], key  # None stays None (dimwise_kl)
            cells.append("—" if run.surgery[key] is None else f"{run.surgery[key]:.2f}")
        assert f"| {run.prior} | {run.latent_dim} | — | " + " | ".join(cells) + " | 1 | " in md


def test_wandb_one_offline_run_per_job_in_one_group(sweep) -> None:
    """Four jobs on two loky workers: a worker runs at least two jobs, each its own wandb run."""
    sweep_dir, _ = sweep
    runs = [rep.read_run(p) for p in rep.find_run_dirs([sweep_dir])]
    assert len(runs) == len(PRIORS) * len(LATENT_DIMS)
    for run in runs:
        offline = list((run.path / "wandb").glob("offline-run-*"))
        assert len(offline) == 1, (run.path, offline)
        (data,) = offline[0].glob("run-*.wandb")
        raw = data.read_bytes()  # the run record: group, name and config keys, stored as protobuf strings
        assert str(sweep_dir).encode() in raw  # group = the sweep dir
        assert f"{run.prior}-z{run.latent_dim}-s0".encode() in raw  # run name
        for key in (b"prior_name", b"latent_dim", f'"{run.prior}"'.encode()):
            assert key in raw
