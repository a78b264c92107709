"""The mixture kernel now against a git revision of it (default HEAD), measured in one run.

    python bench/kernel_ab.py                      # surgery kernel at N = M = 50,000 and training calls
    python bench/kernel_ab.py --ref HEAD~3 --repeats 3
    python bench/kernel_ab.py --n 5000 --repeats 1 # quick

`priors/densities.py` at `--ref` is loaded from git as a module of its own, so both versions
run in this process on the same inputs, alternating (drift on a shared machine hits both).
Measured, each the best of `--repeats`:

1. The surgery's MI + marginal KL kernel: log q(z) of all M = N samples over all N
   posteriors (`DiagonalGaussianMixture.log_prob`, as `aggregate_terms` calls it), on the
   synthetic posteriors of `bench/surgery_speed.py` (15 sharp active dimensions, 25
   collapsed) and on broad ones (log-variance ~ -1 everywhere: every block dense).
2. A training step's kernel: M = 100 points leaving themselves out, against N posteriors,
   forward and backward (`bench/mixture_kernel.py`'s three regimes).

Prints each wall-clock time, the ratio now / ref (< 1: faster now) and the largest difference
between the two versions' results; and the process's CPU time of each (all threads), which
on a machine shared with other jobs measures the work better than the wall clock does.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from surgery_speed import synthetic_posteriors  # noqa: E402

import priors.densities as current  # noqa: E402


def load_revision(ref: str):
    """priors/densities.py at git revision `ref`, imported as a separate module."""
    source = subprocess.run(
        ["git", "show", f"{ref}:priors/densities.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "densities_ref.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("densities_ref", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def compare(name: str, versions: dict, make_call, repeats: int) -> None:
    """Time `make_call(module)()` for each version, alternating; print both, the ratio and the difference."""
    calls = {label: make_call(module) for label, module in versions.items()}
    for call in calls.values():  # warm-up (allocator, thread pool)
        call()
    wall = {label: float("inf") for label in calls}
    cpu = {label: float("inf") for label in calls}
    results = {}
    for _ in range(repeats):
        for label, call in calls.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            results[label] = call()
            wall[label] = min(wall[label], time.perf_counter() - started)
            cpu[label] = min(cpu[label], time.process_time() - started_cpu)
    diff = (results["now"] - results["ref"]).abs().max().item()
    print(
        f"  {name:42s} wall: now {wall['now']:7.3f} s, ref {wall['ref']:7.3f} s, "
        f"now/ref {wall['now'] / wall['ref']:5.2f};"
        f"  cpu: now {cpu['now']:7.3f} s, ref {cpu['ref']:7.3f} s, now/ref {cpu['now'] / cpu['ref']:5.2f};"
        f"  max |now - ref| {diff:.1e}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default="HEAD", help="git revision of priors/densities.py to compare with")
    parser.add_argument("--n", type=int, default=50_000, help="N = M of the surgery kernel")
    parser.add_argument("--d", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-broad", action="store_true", help="leave out the broad surgery case (slow on a CPU)")
    parser.add_argument("--skip-surgery", action="store_true", help="only the training-step calls")
    args = parser.parse_args()
    versions = {"now": current, "ref": load_revision(args.ref)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; now = working tree, ref = {args.ref}")

    print(f"surgery kernel: log q(z) at M = N = {args.n:,}, D = {args.d} (float32 inputs, float64 result)")
    cases = [] if args.skip_surgery else [("sharp (bench/surgery_speed.py posteriors)", 15)]
    if not (args.skip_broad or args.skip_surgery):
        cases.append(("broad (log-variance ~ -1, all dims)", None))
    for name, active in cases:
        if active is None:
            g = torch.Generator().manual_seed(1)
            mu = 0.8 * torch.randn(args.n, args.d, generator=g)
            logvar = -1.0 + 0.3 * torch.randn(args.n, args.d, generator=g)
            z = mu + torch.exp(0.5 * logvar) * torch.randn(args.n, args.d, generator=g)
        else:
            mu, logvar, z = synthetic_posteriors(args.n, args.d, active)

        def surgery_call(module, mu=mu, logvar=logvar, z=z):
            def call():
                with torch.inference_mode():
                    mixture = module.DiagonalGaussianMixture(mu, logvar, small_components=0)
                    return mixture.log_prob(z, out_dtype=torch.float64)

            return call

        compare(name, versions, surgery_call, args.repeats)

    n_train = min(args.n, 50_000)
    print(f"training step: M = 100 leaving themselves out, against N = {n_train:,}, D = {args.d}, forward + backward")
    for name, mean_logvar in (("broad", 0.0), ("mid", -3.0), ("sharp", -6.0)):
        g = torch.Generator().manual_seed(0)
        mu = torch.randn(n_train, args.d, generator=g)
        logvar = mean_logvar + 0.3 * torch.randn(n_train, args.d, generator=g)
        index = torch.randint(n_train, (100,), generator=g)
        z = mu[index] + torch.exp(0.5 * logvar[index]) * torch.randn(100, args.d, generator=g)

        def train_call(module, mu=mu, logvar=logvar, z=z, index=index):
            mixture = module.DiagonalGaussianMixture(mu, logvar, small_components=0)

            def call():
                zz = z.clone().requires_grad_()
                out = mixture.log_prob(zz, exclude=index)
                out.sum().backward()
                return torch.cat([out.detach().double(), zz.grad.double().reshape(-1)])

            return call

        compare(f"{name} (log-variance {mean_logvar:+.0f})", versions, train_call, max(args.repeats, 3) * 3)


if __name__ == "__main__":
    main()
