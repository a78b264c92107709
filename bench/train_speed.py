"""Framework overhead: one training epoch through `vae.trainer.Trainer` against a bare torch loop.

Both train the default model (784-300-300 MLP, z = 40, Gaussian prior, Adam 1e-3, batch
100) for one epoch on dynamically binarized MNIST (50,000 images): the same draw of the
binarization, the same batch order, the same loss. The trainer's epoch also does what a
run needs (a validation pass over 10,000 images, metrics.jsonl, two atomic checkpoints);
those are counted in its time. Runs alternate so drift on a shared machine hits both.

    python bench/train_speed.py [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
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


if __name__ == "__main__":
    main()
