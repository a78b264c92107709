"""Where runs still training stand, and their learning curves copied into the repository.

    python scripts/training_status.py ../runs/<run> [...] [--copy-to results/literature/training]

Prints one markdown table row a run: its name, the last epoch in its `metrics.jsonl`, and
its best validation ELBO with that epoch. `--copy-to DIR` also copies each run's
`metrics.jsonl` to `DIR/<run>/metrics.jsonl`, the curve committed while a run goes on
(results/README.md, "Runs still training").
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.report import learning_curve  # noqa: E402


def standing(run_dir: Path) -> tuple[int, float, int]:
    """(last epoch, best validation ELBO, its epoch) of a run's complete epochs."""
    curve = learning_curve(run_dir / "metrics.jsonl")
    if not curve:
        raise ValueError(f"no complete epoch in {run_dir / 'metrics.jsonl'} (missing or empty)")
    best_epoch, best, _ = max(curve, key=lambda point: point[1])
    return curve[-1][0], best, best_epoch


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
    print("| run | epoch | best validation ELBO (epoch) |\n|---|---|---|")
    for run, epoch, best, best_epoch in rows:
        print(f"| `{run.name}` | {epoch} | {best:.2f} ({best_epoch}) |")
        if args.copy_to is not None:
            (args.copy_to / run.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run / "metrics.jsonl", args.copy_to / run.name / "metrics.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
