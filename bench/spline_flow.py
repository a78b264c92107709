"""The spline flow prior with nflows' layer against priorlab's bins-first layer, in one run.

    python bench/spline_flow.py                    # z = 40, conf/prior/flow_spline.yaml's sizes
    python bench/spline_flow.py --rounds 5 --eval-points 20000

Two `priors.flow.FlowPrior`s with the same weights: one built with nflows'
`MaskedPiecewiseRationalQuadraticAutoregressiveTransform`, one with
`priors.splines.MaskedSplineAutoregressiveTransform` (5 layers, 128 hidden features, 8 bins,
linear tails at 5, nflows' initialization), at points z ~ N(0, 1.5^2 I), nearly all inside
the tail bound as a trained prior's are. The cost hardly depends on the weights (only
through how many points fall inside the bound); the agreement is tested in
tests/priors/test_splines.py (float64). Timed, alternating between the two in every round
(drift on a shared machine hits both):

* evaluation: `log_prob` of `--eval-points` latent points without gradients, the work of
  the importance-sampled log p(x) (K = 5000 on 10,000 test points is 5e7 of them);
* training: `log_prob` of a batch of 100 and its backward pass.

Prints the median over rounds of the seconds per call (process CPU time: one thread by
default), the ratio of the two, and the largest difference of their log densities.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from nflows.transforms import MaskedPiecewiseRationalQuadraticAutoregressiveTransform

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from priors.flow import FlowPrior  # noqa: E402
from priors.splines import MaskedSplineAutoregressiveTransform  # noqa: E402

SPLINE = {"num_bins": 8, "tails": "linear", "tail_bound": 5.0, "num_blocks": 2}


def cpu_seconds(fn: Callable[[FlowPrior], None], flow: FlowPrior, repeats: int) -> float:
    """Process CPU seconds per call of `fn(flow)`, over `repeats` calls."""
    started = time.process_time()
    for _ in range(repeats):
        fn(flow)
    return (time.process_time() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent-dim", type=int, default=40)
    parser.add_argument("--eval-points", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    flows = {
        "nflows": FlowPrior(
            args.latent_dim, layer=partial(MaskedPiecewiseRationalQuadraticAutoregressiveTransform, **SPLINE)
        ),
        "bins first": FlowPrior(args.latent_dim, layer=partial(MaskedSplineAutoregressiveTransform, **SPLINE)),
    }
    flows["bins first"].load_state_dict(flows["nflows"].state_dict())

    g = torch.Generator().manual_seed(1)
    z_eval = torch.randn(args.eval_points, args.latent_dim, generator=g) * 1.5
    z_batch = torch.randn(100, args.latent_dim, generator=g) * 1.5
    with torch.no_grad():
        values = {name: flow.log_prob(z_eval) for name, flow in flows.items()}
    difference = (values["bins first"] - values["nflows"]).abs().max().item()

    def evaluation(flow: FlowPrior) -> None:
        with torch.no_grad():
            flow.log_prob(z_eval)

    def training(flow: FlowPrior) -> None:
        flow.zero_grad()
        flow.log_prob(z_batch).mean().backward()

    print(
        f"z = {args.latent_dim}, 5 spline layers (8 bins, 128 hidden), torch {torch.__version__}, "
        f"{args.threads} thread(s), {args.rounds} rounds; process CPU seconds, median over rounds"
    )
    for task, fn, repeats in (("evaluation", evaluation, 1), ("training step", training, 20)):
        times: dict[str, list[float]] = {name: [] for name in flows}
        for flow in flows.values():  # warm-up
            fn(flow)
        for _ in range(args.rounds):
            for name, flow in flows.items():
                times[name].append(cpu_seconds(fn, flow, repeats))
        median = {name: statistics.median(t) for name, t in times.items()}
        what = f"log_prob of {args.eval_points:,} points" if task == "evaluation" else "log_prob + backward, batch 100"
        print(
            f"  {task:13s} ({what}): nflows {median['nflows'] * 1e3:8.1f} ms, bins first "
            f"{median['bins first'] * 1e3:8.1f} ms, ratio {median['bins first'] / median['nflows']:.2f}"
        )
    print(f"  largest |log p(z)| difference, float32: {difference:.2e}")


if __name__ == "__main__":
    main()
