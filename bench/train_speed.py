"""Framework overhead: one training epoch through `vae.trainer.Trainer` against a bare torch loop.

Both train the default model (784-300-300 MLP, z = 40, Gaussian prior, Adam 1e-3, batch
100) for one epoch on dynamically binarized MNIST (50,000 images): the same draw of the
binarization, the same batch order, the same loss. The trainer's epoch also does what a
run needs (a validation pass over 10,000 images, metrics.jsonl, two atomic checkpoints);
those are counted in its time. Runs alternate so drift on a shared machine hits both.

    python bench/train_speed.py [--repeats 3] [--threads N] [--compile]

`--compile` also trains two epochs with `trainer.compile=true` per repeat and prints its
second (steady) epoch against an eager trainer's, and what the first epoch paid to compile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from priors.gaussian import GaussianPrior  # noqa: E402
from vae.data import TRAIN_ORDER_SALT, derive_seed, mnist  # noqa: E402
from vae.model import VAE  # noqa: E402
from vae.trainer import Trainer  # noqa: E402


def make_model(seed: int) -> VAE:
    torch.manual_seed(seed)
    return VAE.mlp(784, 40, [300, 300], GaussianPrior(40))


def bare_epoch(data, seed: int) -> float:
    model = make_model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    x_epoch = data.train_epoch(0)
    n = len(x_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, TRAIN_ORDER_SALT, 0)))
    for b in range(0, n, 100):
        x = x_epoch[order[b : b + 100]]
        terms = model.elbo_terms(x)
        loss = -(terms.reconstruction - terms.kl).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def trainer_epoch(data, seed: int) -> float:
    model = make_model(seed)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(max_epochs=1, batch_size=100, progress=False, run_dir=run_dir, seed=seed)
        start = time.perf_counter()
        trainer.fit(model, data)
        return time.perf_counter() - start


def compiled_epochs(data, seed: int, compile: bool) -> tuple[float, float]:
    """Seconds of the first and second epoch of a trainer run with `compile` (from metrics.jsonl)."""
    model = make_model(seed)
    torch._dynamo.reset()
    with tempfile.TemporaryDirectory() as run_dir:
        Trainer(max_epochs=2, batch_size=100, progress=False, run_dir=run_dir, seed=seed, compile=compile).fit(
            model, data
        )
        lines = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    return lines[0]["seconds"], lines[1]["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="also time trainer.compile=true against eager")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = mnist(dynamic=True)
    bare_epoch(data, 0)  # warm-up: allocator, thread pool, page cache
    bare, framework = [], []
    for r in range(args.repeats):
        bare.append(bare_epoch(data, r))
        framework.append(trainer_epoch(data, r))
        print(f"repeat {r + 1}: bare loop {bare[-1]:.2f} s, trainer {framework[-1]:.2f} s", flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats")
    # The minimum is the least disturbed run on a shared machine; the median is shown beside it.
    for name, stat in (("fastest", min), ("median", statistics.median)):
        b, f = stat(bare), stat(framework)
        print(f"{name} epoch: bare loop {b:.2f} s, trainer {f:.2f} s, ratio trainer/bare {f / b:.3f} (target <= 1.10)")
    if args.compile:
        eager, compiled = [], []
        for r in range(args.repeats):
            eager.append(compiled_epochs(data, r, compile=False))
            compiled.append(compiled_epochs(data, r, compile=True))
            print(
                f"repeat {r + 1}: epochs 1, 2 eager {eager[-1][0]:.2f}, {eager[-1][1]:.2f} s; "
                f"compiled {compiled[-1][0]:.2f}, {compiled[-1][1]:.2f} s",
                flush=True,
            )
        e, c = min(x[1] for x in eager), min(x[1] for x in compiled)
        paid = min(x[0] - x[1] for x in compiled) - min(x[0] - x[1] for x in eager)
        print(
            f"fastest steady epoch: eager {e:.2f} s, compiled {c:.2f} s, ratio compiled/eager {c / e:.3f}; "
            f"compilation about {paid:.1f} s in the first epoch"
        )


if __name__ == "__main__":
    main()
