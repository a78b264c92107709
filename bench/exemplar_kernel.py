"""The exemplar prior's importance-sampled log p(x): the mixture kernel now against a git revision, in one run.

    python bench/exemplar_kernel.py                    # 3 test points, K = 5000, the committed exemplar model
    python bench/exemplar_kernel.py --points 5 --ref HEAD~1

Per test point, `surgery.decomposition.importance_log_likelihood(model, x, K,
generator=torch.Generator().manual_seed(0))`, where p(z) is the mixture of all N = 50,000
exemplar means with the shared variance (`ExemplarPrior._all_exemplars`), built by three
versions of `priors/densities.py`, alternating point by point (drift on a shared machine hits
all three):

* `ref`: the file at git revision `--ref` (default HEAD), loaded as a module of its own;
* `now`: the working tree;
* `now, index order`: the working tree with spatial ordering off (`ORDER_MIN_COMPONENTS`
  raised past N), which shows what the ordering itself brings.

Each version first evaluates test point 0 (reported apart: it builds the mixture's constants,
and orders them), then `--points` further test points. Prints the median seconds per point,
wall clock and process CPU time (one thread by default: on a machine shared with other jobs
the CPU time measures the work better), the prior's share of the CPU time, the ratio to
`ref`, and the largest |log p(x)| difference to `ref`; then, at test point 1's draws, the
largest float64 log p(z) difference to `ref` and the entries the kernel computed on each path.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from kernel_ab import load_revision  # noqa: E402

import priors.densities as current  # noqa: E402
from lab.checkpoint import load_model  # noqa: E402
from surgery.decomposition import importance_log_likelihood  # noqa: E402

DEFAULT_CHECKPOINT = ROOT / "results/prior_zoo/runs/exemplar/checkpoints/best.pt"


class TimedMixture:
    """A mixture whose log_prob adds its CPU seconds to `cpu`; `index_order` switches ordering off around it."""

    def __init__(self, mixture, index_order: bool = False) -> None:
        self.mixture, self.index_order, self.cpu = mixture, index_order, 0.0
        self.seen: list[torch.Tensor] | None = None  # the points evaluated, while a list

    def log_prob(self, z, *args, **kwargs):
        if self.seen is not None:
            self.seen.append(z.detach().clone())
        saved = current.ORDER_MIN_COMPONENTS
        if self.index_order:
            current.ORDER_MIN_COMPONENTS = sys.maxsize
        started = time.process_time()
        try:
            return self.mixture.log_prob(z, *args, **kwargs)
        finally:
            self.cpu += time.process_time() - started
            current.ORDER_MIN_COMPONENTS = saved

    def sample(self, n, generator=None):
        return self.mixture.sample(n, generator)


@contextlib.contextmanager
def counting_paths(active: bool = True):
    """Counts the working tree's kernel entries by path: dense over a range, over a union of groups, one by one."""
    seen = {"dense over a range": 0, "dense over unions": 0, "one by one": 0}
    dense, exact = current._dense_entries, current._exact_entries

    def dense_spy(x64, comps, span, ex, buf):
        union = isinstance(span, torch.Tensor)
        width = span.shape[0] if union else span[1] - span[0]
        seen["dense over unions" if union else "dense over a range"] += x64.shape[0] * width
        return dense(x64, comps, span, ex, buf)

    def exact_spy(z64, comps, rows, cols):
        seen["one by one"] += rows.shape[0]
        return exact(z64, comps, rows, cols)

    if active:
        current._dense_entries, current._exact_entries = dense_spy, exact_spy
    try:
        yield seen
    finally:
        current._dense_entries, current._exact_entries = dense, exact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--ref", default="HEAD", help="git revision of priors/densities.py to compare with")
    parser.add_argument("--points", type=int, default=3, help="timed test points (after test point 0)")
    parser.add_argument("--samples", type=int, default=5000, help="K importance samples per point")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="then profile one more point with ref and now")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, data, _ = load_model(args.checkpoint)
    model.eval()
    prior = model.prior
    with torch.no_grad():
        exemplars = prior._all_exemplars()  # the working tree's mixture: its means and shared log-variance
    mu, logvar = exemplars.mu.detach(), exemplars.logvar.detach()
    ref = load_revision(args.ref)
    versions = {
        "ref": TimedMixture(ref.DiagonalGaussianMixture(mu, logvar, small_components=0)),
        "now": TimedMixture(current.DiagonalGaussianMixture(mu, logvar, small_components=0)),
        "now, index order": TimedMixture(
            current.DiagonalGaussianMixture(mu, logvar, small_components=0), index_order=True
        ),
    }
    x = data.split("test")[: args.points + 1]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); N = {mu.shape[0]:,} exemplars, "
        f"D = {mu.shape[1]}, K = {args.samples}; ref = {args.ref}, now = working tree"
    )
    runs: dict[str, list[tuple[float, float, float, float]]] = {label: [] for label in versions}

    def estimate(i: int, label: str) -> float:
        prior._all_exemplars = lambda: versions[label]  # the prior evaluates this version's mixture
        try:
            log_px = importance_log_likelihood(
                model, x[i : i + 1], args.samples, generator=torch.Generator().manual_seed(0)
            )
        finally:
            del prior._all_exemplars
        return float(log_px[0])

    draws: list[torch.Tensor] = []  # test point 1's latent draws (the same for every version)
    for i in range(len(x)):
        for label, timed in versions.items():
            timed.cpu = 0.0
            timed.seen = [] if i == 1 and label == "ref" else None
            started, started_cpu = time.perf_counter(), time.process_time()
            log_px = estimate(i, label)
            wall, cpu = time.perf_counter() - started, time.process_time() - started_cpu
            runs[label].append((wall, cpu, timed.cpu, log_px))
            draws += timed.seen or []
            timed.seen = None
    ref_cpu = statistics.median(r[1] for r in runs["ref"][1:])
    ref_wall = statistics.median(r[0] for r in runs["ref"][1:])
    for label, rows in runs.items():
        first, timed = rows[0], rows[1:]
        wall, cpu = statistics.median(r[0] for r in timed), statistics.median(r[1] for r in timed)
        prior_cpu = statistics.median(r[2] for r in timed)
        diff = max(abs(a[3] - b[3]) for a, b in zip(rows, runs["ref"], strict=True))
        print(
            f"  {label:17s} per point: wall {wall:6.3f} s (x{wall / ref_wall:4.2f}), cpu {cpu:6.3f} s "
            f"(x{cpu / ref_cpu:4.2f}), of which p(z) {prior_cpu:6.3f} s;  point 0 (builds the constants): "
            f"cpu {first[1]:6.3f} s;  max |log p(x) - ref| {diff:.1e}"
        )
    print("  log p(x) per point (now):", " ".join(f"{r[3]:.6f}" for r in runs["now"]))
    # The prior returns z's dtype (float32), which hides differences below ~1e-6 nats: compare the
    # mixtures' float64 log p(z) at test point 1's draws.
    z = torch.cat(draws) if draws else None
    if z is not None:
        values, paths = {}, {}
        for label, timed in versions.items():
            with torch.inference_mode(), counting_paths(label != "ref") as paths[label]:
                values[label] = torch.cat([timed.log_prob(part, out_dtype=torch.float64) for part in z.split(2551)])
        for label in ("now", "now, index order"):
            print(
                f"  float64 log p(z) at test point 1's {len(z)} draws, max |{label} - ref|: "
                f"{(values[label] - values['ref']).abs().max().item():.1e} (log p(z) from "
                f"{values['ref'].min().item():.1f} to {values['ref'].max().item():.1f}); entries computed: "
                + ", ".join(f"{count:,} {path}" for path, count in paths[label].items())
            )
    if args.profile:
        for label in ("ref", "now"):
            with torch.profiler.profile() as profile:
                estimate(len(x) - 1, label)
            print(f"profile of one point, {label} (self CPU time, the top operations):")
            print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main()
