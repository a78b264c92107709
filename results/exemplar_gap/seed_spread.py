"""How far seeds of one recipe part: the yardstick for a lag at matched epochs.

    python results/exemplar_gap/seed_spread.py results/literature/runs/lit_z40_*_byte255* \
        --epochs 100 150 200 275 400 500 700 840

Run dirs whose names differ only in a `_seedN` suffix are seeds of one recipe. For each such
group with at least two seeds, and each epoch every seed reached:

1. the range (largest minus smallest) of the seeds' best validation loss so far, the measure
   `probe.py --released-log` compares against the released run, and its sample standard
   deviation: a lag of one run behind another at a matched epoch means little while it stays
   inside this range;
2. with `--since EPOCH`, how far the gap between two seeds moves after EPOCH: over every pair
   of seeds, the largest |gap at the epoch - gap at EPOCH|. A lag that grows after EPOCH by
   less than this is a drift two seeds of one recipe also show.
"""

from __future__ import annotations

import argparse
import itertools
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe import best_so_far, ours_validation  # noqa: E402


def recipe(run: Path) -> str:
    return re.sub(r"_seed\d+$", "", run.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run dirs (each with metrics.jsonl)")
    parser.add_argument("--epochs", type=int, nargs="+", default=[100, 150, 200, 275, 400, 500, 700, 840])
    parser.add_argument("--since", type=int, default=None, help="also: how far two seeds' gap moves after it")
    args = parser.parse_args()
    groups: dict[str, list[Path]] = {}
    for run in args.runs:
        if (run / "metrics.jsonl").is_file():
            groups.setdefault(recipe(run), []).append(run)
    groups = {name: runs for name, runs in groups.items() if len(runs) > 1}
    if not groups:
        sys.exit("seed_spread.py: no recipe with two or more seeds among the runs given")
    curves = {name: [best_so_far(ours_validation(run)) for run in runs] for name, runs in sorted(groups.items())}

    def table(title: str, epochs: list[int], cell) -> None:
        print(f"{title}\n")
        print("| recipe | seeds | " + " | ".join(str(e) for e in epochs) + " |")
        print("|---|---|" + "---|" * len(epochs))
        for name, seeds in curves.items():
            # "—": a seed stopped before the epoch (its best so far would compare unequal counts)
            cells = [cell(seeds, e) if all(e in c for c in seeds) else "—" for e in epochs]
            print(f"| {name} | {len(seeds)} | " + " | ".join(cells) + " |")
        print()

    def spread(seeds: list[dict[int, float]], epoch: int) -> str:
        values = [c[epoch] for c in seeds]
        return f"{max(values) - min(values):.2f} ({statistics.stdev(values):.2f})"

    table("Range (sd) over seeds of the best validation loss so far, nats:", args.epochs, spread)
    if args.since is not None:
        since = args.since

        def moved(seeds: list[dict[int, float]], epoch: int) -> str:
            if not all(since in c for c in seeds):
                return "—"
            pairs = itertools.combinations(seeds, 2)
            return f"{max(abs((a[epoch] - b[epoch]) - (a[since] - b[since])) for a, b in pairs):.2f}"

        later = [e for e in args.epochs if e > since]
        table(f"Largest move, over pairs of seeds, of their gap after epoch {since}, nats:", later, moved)


if __name__ == "__main__":
    main()
