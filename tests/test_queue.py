"""scripts/queue.sh: a list of recipe runs trained one after another, each skipped once evaluated."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

#: One epoch of the recipe shrunk to the digits, its surgery on a budget.
TINY = (
    "prior=gaussian data=digits vae.latent_dim=2 vae.hidden_dims=[16] trainer.max_epochs=1 "
    "surgery.is_samples=20 surgery.is_points=50 surgery.plot_grid=30"
)


def _queue(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "WANDB_SILENT": "true"}
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "queue.sh"), *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_the_queue_trains_each_run_once_and_skips_what_is_evaluated(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    (runs / "done").mkdir(parents=True)
    (runs / "done" / "log_px_test.npy").write_bytes(b"")
    listing = tmp_path / "a.list"
    listing.write_text(f"# a comment, then a blank line\n\ndone prior=gaussian\ntiny {TINY}\n")

    first = _queue(str(ROOT), str(listing), str(runs))
    assert first.returncode == 0, first.stderr
    assert "done: evaluated already, skipped" in first.stdout
    assert "tiny: exit 0" in first.stdout, (runs / "tiny.out").read_text()[-3000:]
    assert (runs / "tiny" / "metrics.jsonl").read_text().count("\n") == 1
    assert (runs / "tiny" / "log_px_test.npy").is_file() and not (runs / "done" / "metrics.jsonl").exists()
    record = (runs / "tiny" / ".hydra" / "hydra.yaml").read_text()
    assert f"dir: {os.path.relpath(runs / 'tiny', ROOT)}\n" in record  # relative to the worktree

    again = _queue(str(ROOT), str(listing), str(runs))
    assert "tiny: evaluated already, skipped" in again.stdout and "start" not in again.stdout


def test_the_queue_names_a_missing_list_or_worktree_in_one_line(tmp_path: Path) -> None:
    missing_dir = _queue(str(ROOT), str(tmp_path / "no_dir" / "a.list"))
    assert missing_dir.returncode == 2 and missing_dir.stderr == f"no such list: {tmp_path / 'no_dir' / 'a.list'}\n"
    assert _queue(str(tmp_path / "none"), str(tmp_path)).stderr == f"no such worktree: {tmp_path / 'none'}\n"
    proc = _queue(str(ROOT), str(tmp_path / "none.list"))
    assert proc.returncode == 2 and proc.stderr == f"no such list: {tmp_path / 'none.list'}\n"


def test_the_queue_trains_the_list_as_it_was_at_its_start(tmp_path: Path) -> None:
    """A finished run's line leaves its list while the queue goes on (docs/experiments.md). The
    queue read the whole list when it started, so that edit neither skips, repeats nor garbles a
    run. A stand-in for python records each call and rewrites the list as a finished run would."""
    listing = tmp_path / "a.list"
    listing.write_text("one prior=gaussian\ntwo prior=mixture\nthree prior=flow\n")
    calls = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nprintf "two prior=mixture\\nthree prior=flow\\n" > {listing}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake)}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "queue.sh"), str(tmp_path), str(listing), str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    dirs = [line.split("hydra.run.dir=")[1].split()[0] for line in calls.read_text().splitlines()]
    assert dirs == ["runs/one", "runs/two", "runs/three"], calls.read_text()


def test_the_queue_reports_a_runs_exit_status_and_takes_names_with_folders(tmp_path: Path) -> None:
    """A run that fails is reported with its own exit status (the queue goes on), and a name with
    a folder (screen/NAME) gets its run dir and its output file in that folder."""
    listing = tmp_path / "a.list"
    listing.write_text("fails prior=gaussian\nscreen/deep prior=flow_deep\n")
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "trained $*"\ncase "$*" in *runs/fails*) exit 3 ;; esac\n')
    fake.chmod(0o755)
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "queue.sh"), str(tmp_path), str(listing), str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": str(fake)},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "fails: exit 3" in proc.stdout and "screen/deep: exit 0" in proc.stdout, proc.stdout + proc.stderr
    assert "hydra.run.dir=runs/screen/deep prior=flow_deep" in (tmp_path / "runs" / "screen" / "deep.out").read_text()
