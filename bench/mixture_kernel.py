"""Milliseconds of the mixture kernel for a training batch against N posteriors, forward and forward + backward.

    python bench/mixture_kernel.py                      # M = 100 against N = 50,000, D = 40
    python bench/mixture_kernel.py --n 10000 --repeats 20
    python bench/mixture_kernel.py --ordered            # on spatially ordered constants (`spatial_order`)

The aggregate-posterior prior's training step in isolation: M points, each leaving its own
component out, against N diagonal-Gaussian components through `DiagonalGaussianMixture`
(constants computed once, as the prior keeps them for an epoch). Three regimes of
posterior log-variance: broad (0, as at initialization: every entry counts, the dense
path), mid (-3) and sharp (-6, a trained model: the located sparse path). Prints the
median over --repeats calls of each. `--ordered` runs them on spatially ordered constants,
which the mixture otherwise keeps for calls of many points only (`ORDER_MIN_ROWS`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import priors.densities as densities  # noqa: E402
from priors.densities import DiagonalGaussianMixture  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--m", type=int, default=100)
    parser.add_argument("--d", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--ordered", action="store_true", help="spatially ordered constants for every call")
    args = parser.parse_args()
    if args.ordered:
        densities.ORDER_MIN_COMPONENTS, densities.ORDER_MIN_ROWS, densities.ORDER_MAX_REACH = 1, 1, 1.0
    g = torch.Generator().manual_seed(0)
    print(
        f"M = {args.m} points against N = {args.n} components, D = {args.d}, {torch.get_num_threads()} threads"
        + (", spatially ordered constants" if args.ordered else "")
    )
    for name, mean_logvar in (("broad", 0.0), ("mid", -3.0), ("sharp", -6.0)):
        mu = torch.randn(args.n, args.d, generator=g)
        logvar = mean_logvar + 0.3 * torch.randn(args.n, args.d, generator=g)
        mixture = DiagonalGaussianMixture(mu, logvar, small_components=0)
        index = torch.randint(args.n, (args.m,), generator=g)
        z = mu[index] + torch.exp(0.5 * logvar[index]) * torch.randn(args.m, args.d, generator=g)

        def forward(z=z, index=index, mixture=mixture):
            with torch.no_grad():
                mixture.log_prob(z, exclude=index)

        def forward_backward(z=z, index=index, mixture=mixture):
            zz = z.clone().requires_grad_()
            mixture.log_prob(zz, exclude=index).sum().backward()

        fwd, both = median_ms(forward, args.repeats), median_ms(forward_backward, args.repeats)
        print(f"  {name:6s} (log-variance {mean_logvar:+.0f}): forward {fwd:6.1f} ms, with backward {both:6.1f} ms")


if __name__ == "__main__":
    main()
