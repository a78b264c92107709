"""The importance-sampling loop with glibc's mmap threshold pinned or dynamic: memory and time.

Loads a trained model, frees one 16 MiB block as the surgery's q(z) kernel does (which
raises a dynamic threshold to 16 MiB), then runs `importance_log_likelihood` on the first
`--points` test points with K = `--samples`, and prints the growth of the process's
high-water mark over the loop (VmHWM, exact), the loop's wall time and the mean of the
log-likelihoods (the same with either setting: the numbers do not depend on the allocator).

    python results/memory/threshold.py --pin          # surgery.memory.pin_mmap_threshold
    python results/memory/threshold.py --no-pin       # glibc's dynamic threshold
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import surgery.decomposition as decomposition
from lab.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "results/literature/runs/lit_z40_gaussian_byte255/checkpoints/best.pt"


def high_water_mb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) >> 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--points", type=int, default=400)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.pin:
        decomposition.pin_mmap_threshold = lambda: False
    model, data, _ = load_model(MODEL)
    x = data.split("test")[: args.points]
    block = torch.empty(2048 * 2048).fill_(1.0)  # the q(z) kernel's block: mapped, then freed
    del block
    open("/proc/self/clear_refs", "w").write("5")  # the high-water mark restarts here
    start_mb = high_water_mb()
    started = time.perf_counter()
    with torch.inference_mode():
        log_px = decomposition.importance_log_likelihood(
            model, x, args.samples, generator=torch.Generator().manual_seed(0)
        )
    seconds = time.perf_counter() - started
    print(
        f"pin={args.pin} points={args.points} K={args.samples}: high-water mark +{high_water_mb() - start_mb} MB "
        f"over the loop (from {start_mb} MB), {seconds:.1f} s, mean log p(x) {log_px.mean().item():.6f}"
    )


if __name__ == "__main__":
    main()
