"""Throughput of long CPU runs: one job on N threads against N single-threaded jobs side by side.

Each configuration trains `python train.py` for a few epochs (same model, data and seed)
and reads the per-epoch seconds from each run's metrics.jsonl, so start-up and the final
evaluation are not counted. It prints epochs per hour of the whole machine for both
layouts and their ratio, measured in this one run.

    python bench/parallel_jobs.py [--epochs 3] [--jobs 2] [ARGS for train.py, e.g. vae=gated_mlp prior=vampprior]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch(run_dir: Path, threads: int, epochs: int, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "WANDB_SILENT": "true"}
    cmd = [
        sys.executable,
        "train.py",
        "logger=none",
        "surgery.enabled=false",
        "trainer.progress=false",
        f"trainer.max_epochs={epochs}",
        "device=cpu",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def epoch_seconds(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    # The first epoch pays for warm caches and allocator growth; it is left out.
    return [json.loads(line)["seconds"] for line in lines][1:]


def run_layout(tmp: Path, name: str, jobs: int, threads: int, epochs: int, extra: list[str]) -> float:
    """Epochs per hour summed over `jobs` concurrent jobs of `threads` threads each."""
    dirs = [tmp / f"{name}-{i}" for i in range(jobs)]
    procs = [launch(d, threads, epochs, extra) for d in dirs]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{name}: train.py failed:\n{err[-2000:]}")
    per_job = [statistics.median(epoch_seconds(d)) for d in dirs]
    for d, s in zip(dirs, per_job, strict=False):
        print(f"  {d.name}: median {s:.2f} s/epoch ({threads} thread{'s' if threads > 1 else ''})")
    return sum(3600.0 / s for s in per_job)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per job (the first is not timed)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="N: cores to share")
    args, extra = parser.parse_known_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is not timed)")
    with tempfile.TemporaryDirectory() as tmp:
        print(f"one job, {args.jobs} threads:")
        one = run_layout(Path(tmp), "one", 1, args.jobs, args.epochs, extra)
        print(f"{args.jobs} jobs side by side, 1 thread each:")
        many = run_layout(Path(tmp), "many", args.jobs, 1, args.epochs, extra)
    print(
        f"epochs per hour, whole machine: one {args.jobs}-thread job {one:.0f}, "
        f"{args.jobs} single-threaded jobs {many:.0f}; ratio (side by side / one) {many / one:.2f}"
    )


if __name__ == "__main__":
    main()
