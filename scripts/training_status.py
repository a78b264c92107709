"""Where runs still training stand, and their learning curves copied into the repository.

    python scripts/training_status.py ../runs/<run> [...] [--copy-to results/literature/training]

Prints one markdown table row a run: its name, the last epoch in its `metrics.jsonl`, and
its best validation ELBO with that epoch. `--copy-to DIR` also copies each run's
`metrics.jsonl` to `DIR/<run>/metrics.jsonl`, the curve committed while a run goes on
(results/README.md, "Runs still training").
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def standing(run_dir: Path) -> tuple[int, float, int]:
    """(last epoch, best validation ELBO, its epoch) of a run's complete epochs."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epochs = [line for line in lines if line.get("complete_epoch", True) and "val_elbo" in line]
    if not epochs:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no complete epoch yet")
    best = max(epochs, key=lambda line: line["val_elbo"])
    return epochs[-1]["epoch"], best["val_elbo"], best["epoch"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories holding metrics.jsonl")
    parser.add_argument("--copy-to", type=Path, default=None, help="copy each metrics.jsonl to DIR/<run>/")
    args = parser.parse_args(argv)
    try:
        rows = [(run, *standing(run)) for run in args.runs]
    except (OSError, ValueError) as e:
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
