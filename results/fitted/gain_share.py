"""Each fitted prior's gain in test log p(x) over the model it was fitted to, as a share of the
gain of a prior trained with the model (issue 26, item 5), paired over the test points.

    python results/fitted/gain_share.py --base results/literature/runs/lit_z40_gaussian_byte255 \
        --trained results/literature/runs/lit_z40_flow_byte255 results/fitted/lit_z40_gaussian_byte255-*

Every folder holds `log_px_test.npy`, the per-point test log p(x) of its model on the first n
test points (a fit evaluates `surgery.is_points` of them; a trained run all 10,000). A fit
that started from another fit (`fit.warm_start`) is still compared with `--base`, the model
the chain began from, so its gain is the whole chain's. Each gain is the mean of the paired
per-point differences on the fit's n points, ± their standard error; the importance draws
of the two estimates are independent, so that error includes their noise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vae.model import NETWORKS  # noqa: E402


def per_point(folder: Path) -> np.ndarray:
    return np.load(folder / "log_px_test.npy").astype(np.float64)


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """mean(a - b) ± its standard error, over the first len(a) points of both."""
    d = a - b[: len(a)]
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def describe(folder: Path) -> str:
    """What was fitted and how, from the fit's fit.json."""
    fit = json.loads((folder / "fit.json").read_text())
    frozen = fit.get("frozen", NETWORKS)
    refitted = [n for n in NETWORKS if n not in frozen]
    options = fit.get("fit_options") or {}
    how = "networks frozen" if not refitted else " and ".join(refitted) + " refitted"
    if options.get("warm_start"):
        how += ", prior from the checkpoint"
    if options.get("rebinarize"):
        how += ", fresh binarizations"
    return f"{fit['new_prior']} ({how})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the trained run the fits started from")
    parser.add_argument("--trained", type=Path, required=True, help="the run whose prior was trained with the model")
    parser.add_argument("fitted", type=Path, nargs="+", help="fit folders (each with log_px_test.npy and fit.json)")
    args = parser.parse_args()
    base, trained = per_point(args.base), per_point(args.trained)
    print(f"base: {args.base}; trained prior: {args.trained}")
    print("| fit | points | gain over the base, paired | trained prior's gain, same points | share | trained - fit |")
    print("|---|---|---|---|---|---|")
    for folder in args.fitted:
        if not (folder / "log_px_test.npy").exists():
            print(f"| {folder.name}: {describe(folder)} | — | no per-point log p(x) | | | |")
            continue
        fitted = per_point(folder)
        n = len(fitted)
        gain, gain_se = paired(fitted, base)
        reference, reference_se = paired(trained[:n], base)
        gap, gap_se = paired(trained[:n], fitted)
        print(
            f"| {folder.name}: {describe(folder)} | {n:,} | {gain:+.3f} ± {gain_se:.3f} | "
            f"{reference:+.3f} ± {reference_se:.3f} | {100 * gain / reference:.0f}% | {gap:+.3f} ± {gap_se:.3f} |"
        )


if __name__ == "__main__":
    main()
