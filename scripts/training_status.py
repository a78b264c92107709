"""Where runs still training stand, and their learning curves copied into the repository.

    python scripts/training_status.py ../runs/<run> [...] [--copy-to results/literature/training]

Prints one markdown table row a run: its name, the last epoch in its `metrics.jsonl`, its
best validation ELBO with that epoch, the hours its complete epochs took (what the rule for
committing a safeguard counts: at most one per 8 hours of a run's training), and the slope
of the validation ELBO over the last 50 epochs (nats per 100 epochs: near 0, the run is
close to its early stop). `--copy-to DIR` also copies each run's
`metrics.jsonl` to `DIR/<run>/metrics.jsonl`, the curve committed while a run goes on
(results/README.md, "Runs still training").
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.report import learning_curve, recent_slope  # noqa: E402


def standing(run_dir: Path) -> tuple[int, float, int, float, float | None]:
    """(last epoch, best validation ELBO, its epoch, hours trained, recent slope per epoch) of a
    run's complete epochs; the hours are NaN when an epoch has no `seconds`."""
    curve = learning_curve(run_dir / "metrics.jsonl")
    if not curve:
        raise ValueError(f"no complete epoch in {run_dir / 'metrics.jsonl'} (missing or empty)")
    best_epoch, best, _ = max(curve, key=lambda point: point[1])
    hours = sum(seconds for _, _, seconds in curve) / 3600
    return curve[-1][0], best, best_epoch, hours, recent_slope(curve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories holding metrics.jsonl")
    parser.add_argument("--copy-to", type=Path, default=None, help="copy each metrics.jsonl to DIR/<run>/")
    args = parser.parse_args(argv)
    try:
        rows = [(run, *standing(run)) for run in args.runs]
    except ValueError as e:
        print(f"training_status: error: {e}", file=sys.stderr)
        return 2
    print(
        "| run | epoch | best validation ELBO (epoch) | hours trained | slope, last 50 epochs |\n|---|---|---|---|---|"
    )
    for run, epoch, best, best_epoch, hours, slope in rows:
        trained = "—" if math.isnan(hours) else f"{hours:.1f}"
        per_100 = "—" if slope is None else f"{100 * slope:+.2f} / 100 epochs"
        print(f"| `{run.name}` | {epoch} | {best:.2f} ({best_epoch}) | {trained} | {per_100} |")
        if args.copy_to is not None:
            (args.copy_to / run.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run / "metrics.jsonl", args.copy_to / run.name / "metrics.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
