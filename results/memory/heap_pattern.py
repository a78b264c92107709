"""The importance-sampling loop's allocations, without its arithmetic: does glibc's heap grow?

Each step allocates and frees the tensors one decoder call of `importance_log_likelihood`
makes at the default K = 500 (5 points x 500 samples: 400 KB of noise, 3 MB hidden layers,
7.8 MB logits), after a freed 16 MiB block has raised glibc's mmap threshold as the q(z)
kernel does. It prints the resident size and glibc's own count of the heap's bytes in use
and free (`mallinfo2`) every 50 steps. `--pin` first fixes glibc's mmap threshold
(`surgery.memory.pin_mmap_threshold`, what the surgery does), so that the freed block
cannot raise it.

    python results/memory/heap_pattern.py --steps 300         # grows to 0.9-2.1 GB
    python results/memory/heap_pattern.py --steps 300 --pin   # stays near 250 MB
"""

from __future__ import annotations

import argparse
import ctypes
import math

import torch

from surgery.memory import pin_mmap_threshold


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
        + ("keepcost",)
    ]


LIBC = ctypes.CDLL("libc.so.6")
LIBC.mallinfo2.restype = _MallInfo2


def state() -> str:
    rss = next(int(line.split()[1]) >> 10 for line in open("/proc/self/status") if line.startswith("VmRSS"))
    info = LIBC.mallinfo2()
    return f"rss {rss} MB, heap in use {info.uordblks >> 20} MB, heap free {info.fordblks >> 20} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--pin", action="store_true", help="pin glibc's mmap threshold first")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.pin:
        assert pin_mmap_threshold(), "this C library has no mallopt"
    block = torch.empty(2048 * 2048).fill_(1.0)  # a q(z) kernel block: 16 MiB, mmapped, freed
    del block
    points, samples, latent, hidden, pixels = 5, 500, 40, 300, 784
    kept = []
    print("start", state(), flush=True)
    for step in range(1, args.steps + 1):
        mu = torch.zeros(points, latent)
        running = torch.full((points,), -math.inf, dtype=torch.float64)
        eps = torch.ones(points, samples, latent)
        z = mu[:, None] + eps
        h1 = torch.ones(points * samples, hidden).relu()
        h2 = torch.ones(points * samples, hidden).relu()
        del h1
        logits = torch.ones(points * samples, pixels)
        del h2
        log_px = (logits * 2 - torch.nn.functional.softplus(logits)).sum(-1).view(points, samples)
        del logits
        log_w = (log_px + z.square().sum(-1)).double()
        running = torch.logaddexp(running, torch.logsumexp(log_w, dim=1))
        kept.append(running - 1.0)  # the per-point result the loop keeps
        if step % 50 == 0:
            print(f"step {step:4d}", state(), flush=True)


if __name__ == "__main__":
    main()
