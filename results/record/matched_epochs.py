"""Validation ELBO of screen runs at matched epochs, against reference runs' learning curves
(issue 26, item 4).

    python results/record/matched_epochs.py --reference results/literature/runs/lit_z40_flow_byte255 \
        results/literature/runs/lit_z40_flow_byte255_seed1 --runs results/record/screens/* --epochs 50 100 150

Each column is an epoch; each cell the run's validation ELBO there (the trainer's metrics.jsonl:
the same 10,000 validation points every epoch), and for a screen run its difference from the
first reference. The second and later references show how far two seeds of one recipe drift
apart at that epoch: a screen's difference smaller than that is no evidence.

`--plot FILE.png` also draws every run's difference from the first reference at every epoch
both have, with the later references' drift beside them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from statistics import fmean

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lab.report import learning_curve  # noqa: E402


def curve(run: Path) -> dict[int, float]:
    """Epoch -> validation ELBO of a run's complete epochs (the report's `learning_curve`)."""
    return {epoch: value for epoch, value, _ in learning_curve(run / "metrics.jsonl")}


def cell(value: float | None, base: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" if base is None else f"{value:.2f} ({value - base:+.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, nargs="+", required=True, help="reference run directories")
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="screen run directories")
    parser.add_argument("--epochs", type=int, nargs="+", default=[50, 100, 150])
    parser.add_argument("--plot", type=Path, help="also draw the differences at every epoch into this PNG")
    args = parser.parse_args()
    first = curve(args.reference[0])
    print("| run | " + " | ".join(f"epoch {e}" for e in args.epochs) + " |")
    print("|---" * (len(args.epochs) + 1) + "|")
    for i, run in enumerate(args.reference):
        c = curve(run)
        cells = [cell(c.get(e), None if i == 0 else first.get(e)) for e in args.epochs]
        print(f"| {run} (reference) | " + " | ".join(cells) + " |")
    for run in args.runs:
        c = curve(run)
        print(f"| {run} | " + " | ".join(cell(c.get(e), first.get(e)) for e in args.epochs) + " |")
    if args.plot:
        plot(args.reference, args.runs, args.plot)
        print(f"wrote {args.plot}")


#: Epochs in the plot's running mean (the thick lines; the thin ones are each epoch's).
SMOOTH = 10


def plot(references: list[Path], runs: list[Path], out: Path) -> None:
    """Each run's validation ELBO minus the first reference's, at every epoch both have: thin,
    and as a running mean over the last `SMOOTH` epochs, thick."""
    from surgery.plots import new_figure

    first = curve(references[0])
    fig = new_figure(8, 4.5)
    ax = fig.add_subplot()
    for i, run in enumerate([*references[1:], *runs]):
        c = curve(run)
        epochs = sorted(set(c) & set(first))
        drift = i < len(references) - 1
        lead = [c[e] - first[e] for e in epochs]
        (line,) = ax.plot(epochs, lead, color="grey" if drift else None, linewidth=0.6, alpha=0.35)
        mean = [fmean(lead[max(0, j - SMOOTH + 1) : j + 1]) for j in range(len(lead))]
        ax.plot(
            epochs,
            mean,
            color=line.get_color(),
            linestyle="--" if drift else "-",
            linewidth=1.6,
            label=f"{run.name} (another seed of the reference)" if drift else run.name,
        )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation ELBO − {references[0].name}'s (nats)")
    ax.set_title(f"Lead over the reference at matched epochs (thick: mean of the last {SMOOTH})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
