"""Does our exemplar objective push the encoder where the paper's does? A gradient probe.

    python results/exemplar_gap/gradient_probe.py [--checkpoint PATH] [--batches 3] [--subset 25000]

Our runs train the prior term on each point's k = 10 nearest exemplars (`exemplars: knn`);
the released code draws 25,000 random exemplars a batch (`exemplars: random`), both encoded
with gradient and leaving the point's own exemplar out. The exact leave-one-out prior over
all N - 1 other exemplars (`exemplars: all`) is what both stand in for. At a checkpoint of
the grey-level run, per batch of 100 training points (one posterior draw each, the same for
every objective), this computes the gradient of the batch's mean log p(z) with respect to
the encoder's parameters under each objective, and prints the cosine between them and their
norms, and the gradient with respect to the prior's shared log variance apart. Two random
draws show the paper's objective's own noise. `random_knn` (each point's k = 10 nearest
within the same random draw, normalized as `random` is) is the paper's objective at knn's
cost: its columns say how close it comes. Every objective is the prior's own `log_prob`
with the point indices as context; only `exemplars` (and `num_exemplars`) change between them.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lab.checkpoint import load_model  # noqa: E402

CHECKPOINT = Path("results/literature/training/lit_z40_exemplar_grey_byte255/checkpoints/last.pt")


def gradient(model, z_of, index: torch.Tensor, exemplars: str, subset: int, seed: int) -> tuple[torch.Tensor, float]:
    """The gradient of the batch's mean log p(z) under one exemplar objective: with respect to
    the encoder's parameters (flat, float64), and to the prior's shared log variance."""
    prior = model.prior
    prior.exemplars, prior.num_exemplars = exemplars, subset
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    torch.manual_seed(seed)  # the random objective's draw of exemplars
    value = prior.log_prob(z_of(), context=index).mean()
    *grads, variance = torch.autograd.grad(value, [*encoder, prior.logvar])
    return torch.cat([g.reshape(-1) for g in grads]).double(), float(variance.sum())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--subset", type=int, default=25_000, help="exemplars a batch for the paper's objective")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, data, _ = load_model(args.checkpoint)
    model.train()
    train = data.split("train")
    print(f"checkpoint: {args.checkpoint}; N = {len(train)}; batches of 100; random subset {args.subset}")
    print(
        "| batch | cos(knn, all) | cos(random, all) | cos(random, random') | cos(knn, random) "
        "| cos(random_knn, random) | norm knn / all | norm random / all | norm random_knn / random "
        "| d/d logvar: knn | all | random | random_knn | seconds |"
    )
    print("|---" * 14 + "|")
    rows = []
    for b in range(args.batches):
        g = torch.Generator().manual_seed(100 + b)
        index = torch.randperm(len(train), generator=g)[:100]
        x = train[index]
        eps = torch.randn(100, model.latent_dim, generator=g)

        def z_of(x=x, eps=eps):
            mu, logvar = model.encoder(x)
            return mu + torch.exp(0.5 * logvar) * eps

        start = time.perf_counter()
        (knn, knn_var), (exact, exact_var) = (
            gradient(model, z_of, index, e, args.subset, seed=0) for e in ("knn", "all")
        )
        (random_a, random_var), (random_b, _) = (
            gradient(model, z_of, index, "random", args.subset, seed=s) for s in (1, 2)
        )
        retrieved, retrieved_var = gradient(model, z_of, index, "random_knn", args.subset, seed=1)  # random_a's draw
        row = (
            cosine(knn, exact),
            cosine(random_a, exact),
            cosine(random_a, random_b),
            cosine(knn, random_a),
            cosine(retrieved, random_a),
            float(knn.norm() / exact.norm()),
            float(random_a.norm() / exact.norm()),
            float(retrieved.norm() / random_a.norm()),
            knn_var,
            exact_var,
            random_var,
            retrieved_var,
        )
        rows.append(row)
        seconds = time.perf_counter() - start
        print(f"| {b} | " + " | ".join(f"{v:.3f}" for v in row) + f" | {seconds:.0f} |")
    means = [sum(r[i] for r in rows) / len(rows) for i in range(len(rows[0]))]
    print("| mean | " + " | ".join(f"{v:.3f}" for v in means) + " | |")
    if not math.isfinite(sum(means)):
        sys.exit("a gradient was not finite")


if __name__ == "__main__":
    main()
