"""Where the converged exemplar prior loses to the published one: probes of the trained model.

    python results/exemplar_gap/probe.py [--released-log whole_log.txt [--plot lag.png]]

The run (results/literature/runs/lit_z40_exemplar_byte255) scored -83.05 +- 0.22 against the
published -82.09 +- 0.18. This script measures the candidates, each directly:

1. With `--released-log` (the authors' released dynamic-MNIST exemplar run, its
   `whole_log.txt`: `fetch github:sajadn/Exemplar-VAE`, then `git show HEAD:"pretrained_model/
   exemplar_prior_on_dynamic_mnist_model_name=vae/1/whole_log.txt"`): the best validation
   loss so far of both runs at matched epochs. A lag that is already there at epoch 100 is
   not the early stop's.
2. The learned shared variance against the one that serves held-out points best: the mean
   log p(z) of all N exemplars at one draw z ~ q(z|x) per validation point, for a grid of
   variances. Only the prior term of the validation ELBO depends on it, so each difference
   is that ELBO's change.
3. What the training objective sees. On training points (one draw each), the leave-one-out
   log density of all N - 1 other exemplars against the sum over the k = 10 nearest only
   (the `knn` objective's terms, normalized by N - 1 here) and against a random half of the
   exemplars (the paper's objective: 25,000 of 50,000 per batch).
4. The exemplars' inputs: this run encodes the training images binarized once; the paper's
   exemplars are the grey-level images. The validation log p(z) with the grey images'
   means, with the same encoder.
5. The same swap in test log p(x): importance sampling of the first test points with both
   sets of exemplar means, on the same draws, paired.

Every density is computed here directly in float64 (squared distances by one matrix product
per chunk), and checked at the learned variance against the prior's own `log_prob`.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lab.checkpoint import load_model  # noqa: E402
from lab.report import learning_curve  # noqa: E402
from priors.densities import reparameterize  # noqa: E402
from surgery.decomposition import importance_log_likelihood  # noqa: E402
from vae.callbacks import encode  # noqa: E402

RUN = Path("results/literature/runs/lit_z40_exemplar_byte255")
EPOCHS = (10, 25, 50, 100, 150, 200, 300, 400, 500, 600, 700, 790, 840, 1038)
SCALES = (0.5, 0.7, 0.85, 1.0, 1.2, 1.4, 1.7, 2.0, 2.5)
K = 10
SUBSET = 25_000


def best_so_far(losses: dict[int, float]) -> dict[int, float]:
    out, best = {}, math.inf
    for epoch in sorted(losses):
        best = min(best, losses[epoch])
        out[epoch] = best
    return out


def released_validation(path: Path) -> dict[int, float]:
    """Epoch -> validation loss (the negative ELBO at beta = 1) from the authors' training log."""
    pattern = re.compile(r"Epoch: (\d+)/\d+.*?o Val\.\s+loss: ([\d.]+)", re.S)
    return {int(e): float(v) for e, v in pattern.findall(path.read_text())}


def ours_validation(run: Path) -> dict[int, float]:
    """Epoch -> validation loss (the negative validation ELBO) of a priorlab run's complete epochs."""
    return {epoch: -value for epoch, value, _ in learning_curve(run / "metrics.jsonl")}


def squared_distances(z: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """`[B, N]` float64 |z_b - mu_n|^2."""
    z, means = z.double(), means.double()
    d2 = z.square().sum(-1, keepdim=True) - 2 * z @ means.T + means.square().sum(-1)
    return d2.clamp_min(0)


def log_mixture(d2: torch.Tensor, var: float, dim: int, count: torch.Tensor | float) -> torch.Tensor:
    """log (1/count) sum_n N(z; mu_n, var I) from squared distances (entries of +inf drop out)."""
    count = torch.as_tensor(count, dtype=torch.float64)
    return torch.logsumexp(-0.5 * d2 / var, -1) - 0.5 * dim * math.log(2 * math.pi * var) - count.log()


def mean_se(x: torch.Tensor) -> str:
    return f"{x.mean().item():+.3f} +- {x.std().item() / math.sqrt(len(x)):.3f}"


def best_curves(log: Path, runs: list[Path]) -> tuple[dict[int, float], dict[Path, dict[int, float]]]:
    """Best validation loss so far per epoch: the released run's, and each run's here."""
    return best_so_far(released_validation(log)), {run: best_so_far(ours_validation(run)) for run in runs}


def matched_epochs(theirs: dict[int, float], ours: dict[Path, dict[int, float]], epochs: list[int]) -> None:
    print(
        f"\n1. Best validation loss so far (nats) at matched epochs: the released run ({max(theirs)} epochs), "
        "and each run here minus it"
    )
    print("| epoch | released | " + " | ".join(f"{run} ({max(c)} epochs)" for run, c in ours.items()) + " |")
    print("|---" * (len(ours) + 2) + "|")
    for e in epochs:
        cells = []
        for run, c in ours.items():
            last = max(c)
            finished = (run / "log_px_test.npy").exists()  # evaluated: it stopped at `last`, its best stands
            value = c.get(e, c[last] if e > last and finished else None)
            cells.append("—" if value is None else f"{value:.2f} ({value - theirs[e]:+.2f}){' stopped' * (e > last)}")
        print(f"| {e} | {theirs[e]:.2f} | " + " | ".join(cells) + " |")


def plot_lag(theirs: dict[int, float], ours: dict[Path, dict[int, float]], labels: list[str], out: Path) -> None:
    """Each run's best validation loss so far minus the released run's, against the epoch (from 10)."""
    from surgery.plots import new_figure

    fig = new_figure(8, 4.5)
    ax = fig.subplots()
    ax.axhline(0.0, color="black", lw=0.8, label="the released run (Norouzi et al.)")
    for curve, label in zip(ours.values(), labels, strict=True):
        epochs = [e for e in sorted(curve) if e in theirs and e >= EPOCHS[0]]  # before: the KL warm-up's swings
        ax.plot(epochs, [curve[e] - theirs[e] for e in epochs], label=f"{label} ({max(curve)} epochs)")
    ax.set_xscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("best validation loss so far − released run's (nats)")
    ax.set_title("Exemplar prior, z = 40: how far each run lags the released one (above 0: behind)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"plot: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=RUN, help="the converged run the probes 2-4 load")
    parser.add_argument("--compare", type=Path, nargs="*", default=[], help="more runs for the matched epochs")
    parser.add_argument("--released-log", type=Path, default=None)
    parser.add_argument("--matched-only", action="store_true", help="only the matched epochs (1), no probes")
    parser.add_argument("--epochs", type=int, nargs="+", default=list(EPOCHS), help="the matched epochs (1)")
    parser.add_argument("--plot", type=Path, default=None, help="with --released-log: draw the lag of each run")
    parser.add_argument("--labels", nargs="*", default=None, help="the runs' names in the plot (default: paths)")
    parser.add_argument("--loglik-points", type=int, default=2000, help="test points for probe 5 (0: skip it)")
    parser.add_argument("--loglik-samples", type=int, default=1000, help="importance samples K for probe 5")
    parser.add_argument("--train-points", type=int, default=2000, help="training points for probe 3")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.released_log is not None:
        runs = [args.run, *args.compare]
        theirs, ours = best_curves(args.released_log, runs)
        if missing := [e for e in args.epochs if e not in theirs]:
            parser.error(f"--epochs {missing}: the released run has epochs {min(theirs)} to {max(theirs)}")
        matched_epochs(theirs, ours, args.epochs)
        if args.plot is not None:
            labels = args.labels or [str(run) for run in runs]
            if len(labels) != len(runs):
                parser.error(f"--labels names {len(labels)} runs, but there are {len(runs)} (--run and --compare)")
            plot_lag(theirs, ours, labels, args.plot)
    if args.matched_only:
        return

    model, data, _ = load_model(args.run / "checkpoints" / "model.pt")
    model.eval()
    prior = model.prior
    means = prior.cache_mu.double()
    n, dim = means.shape
    learned = prior.logvar.exp().item()
    print(
        f"\nmodel: {args.run}, N = {n} exemplars, D = {dim}; learned shared variance {learned:.4f} "
        f"(sd {math.sqrt(learned):.3f})"
    )

    with torch.no_grad():
        z_val = reparameterize(*model.encoder(data.split("val")), torch.Generator().manual_seed(1)).double()
        own = prior.log_prob(z_val.float()).double()
        d2_val = torch.cat([squared_distances(c, means) for c in z_val.split(500)])
    check = log_mixture(d2_val, learned, dim, n)
    print(
        f"check: direct float64 against the prior's log_prob at the learned variance, max |diff| "
        f"{(check - own).abs().max().item():.2e} nats"
    )

    print("\n2. Validation: mean log p(z) of all N exemplars at variance s * learned, minus at the learned one")
    print("| s | variance | difference (nats) |\n|---|---|---|")
    for s in SCALES:
        diff = log_mixture(d2_val, s * learned, dim, n) - check
        print(f"| {s} | {s * learned:.4f} | {mean_se(diff)} |")

    with torch.no_grad():
        idx = torch.randperm(n)[: args.train_points]
        z_tr = reparameterize(*model.encoder(data.split("train")[idx]), torch.Generator().manual_seed(2)).double()
        d2_tr = torch.cat([squared_distances(c, means) for c in z_tr.split(500)])
    d2_tr[torch.arange(len(idx)), idx] = math.inf  # leave-one-out
    near = d2_tr.topk(K, dim=-1, largest=False).values
    half = torch.rand(d2_tr.shape).argsort(-1) < SUBSET  # a random 25,000 of each row's columns
    d2_half = torch.where(half, d2_tr, math.inf)
    counts = half.sum(-1) - half[torch.arange(len(idx)), idx].long()
    print(
        f"\n3. Training points ({len(idx)}, one draw each): leave-one-out densities, minus the full sum over "
        f"N - 1; and the top-{K} responsibility mass"
    )
    print(f"| variance | top-{K}, / (N - 1) | random {SUBSET:,}, / count | mass of the top {K} |\n|---|---|---|---|")
    for s in (0.7, 1.0, 1.4, 2.0):
        var = s * learned
        full = log_mixture(d2_tr, var, dim, n - 1)
        top = log_mixture(near, var, dim, n - 1) - full
        sub = log_mixture(d2_half, var, dim, counts) - full
        mass = top.exp()
        print(
            f"| {var:.4f} | {mean_se(top)} | {mean_se(sub)} | {mass.mean().item():.3f} "
            f"(median {mass.median().item():.3f}) |"
        )
    for name, objective in (
        ("full leave-one-out", lambda v: log_mixture(d2_tr, v, dim, n - 1)),
        (f"top-{K}", lambda v: log_mixture(near, v, dim, K)),
        (f"random {SUBSET:,}", lambda v: log_mixture(d2_half, v, dim, counts)),
    ):
        values = {s: objective(s * learned).mean().item() for s in SCALES}
        best = max(values, key=values.get)
        print(f"the variance the {name} objective prefers on this grid: {best} * learned ({best * learned:.4f})")

    with torch.no_grad():
        grey_means, _ = encode(model.encoder, data.grey["train"], 1000, torch.device("cpu"))
        shift = (grey_means.double() - means).norm(dim=-1)
        scales = (0.7, 1.0, 1.4, 2.0)
        grey = torch.cat(
            [
                torch.stack([log_mixture(squared_distances(c, grey_means), s * learned, dim, n) for s in scales], -1)
                for c in z_val.split(500)
            ]
        )
    print(
        f"\n4. Grey-level exemplars (same encoder): |mu(grey) - mu(binary)| median {shift.median().item():.3f}, "
        f"90th percentile {shift.quantile(0.9).item():.3f}"
    )
    print("| s | validation mean log p(z): grey means at s * learned minus binary means at learned |\n|---|---|")
    for j, s in enumerate(scales):
        print(f"| {s} | {mean_se(grey[:, j] - check)} |")

    if args.loglik_points:
        x = data.split("test")[: args.loglik_points]
        values = []
        for cache in (prior.cache_mu.clone(), grey_means):
            prior.update_encodings(cache, torch.zeros_like(cache))
            with torch.no_grad():
                values.append(importance_log_likelihood(model, x, args.loglik_samples))
        diff = values[1] - values[0]  # the same draws z ~ q(z|x): only the prior's means differ
        print(
            f"\n5. Test log p(x), K = {args.loglik_samples}, first {len(x)} test points, same draws: binarized "
            f"exemplars {values[0].mean().item():.3f}, grey-level {values[1].mean().item():.3f}; paired "
            f"grey - binarized {mean_se(diff)}"
        )


if __name__ == "__main__":
    main()
