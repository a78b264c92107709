"""The surgery's memory: freed tensors leave the process, and the marginals' passes bound their working set."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import surgery.decomposition as decomposition
import surgery.memory as memory
from priors.gaussian import GaussianPrior
from vae.model import VAE

ROOT = Path(__file__).resolve().parents[2]
GLIBC = sys.platform.startswith("linux") and memory._MALLOPT is not None and Path("/proc/self/status").exists()

#: 200 freed 1 MiB tensors below a live one: glibc keeps them in its heap unless they were
#: mapped. Prints the resident growth (MB) they leave behind.
HELD_AFTER_FREE = textwrap.dedent(
    """
    import sys, torch
    import surgery.memory as memory
    def rss_mb():
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) >> 10
    if sys.argv[1] == "pin":
        assert memory.pin_mmap_threshold()
    big = torch.empty(4 << 20); big.fill_(1); del big  # a freed 16 MiB block, as the q(z) kernel's
    start = rss_mb()
    held = [torch.empty(1 << 18).fill_(1) for _ in range(200)]  # 200 x 1 MiB
    top = torch.empty(1 << 19).fill_(1)  # alive, after them
    del held
    print(rss_mb() - start)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt and /proc are Linux's")
def test_pinned_threshold_returns_freed_tensors_that_the_dynamic_one_keeps():
    def left_mb(mode):
        out = subprocess.run(
            [sys.executable, "-c", HELD_AFTER_FREE, mode], cwd=ROOT, capture_output=True, text=True, check=True
        )
        return int(out.stdout.split()[-1])

    assert left_mb("dynamic") >= 150, "glibc returned the freed tensors by itself: the premise is gone"
    assert left_mb("pin") < 20


def test_the_surgery_entry_points_pin_the_threshold(monkeypatch):
    calls = []
    monkeypatch.setattr(decomposition, "pin_mmap_threshold", lambda: calls.append(1) or True)
    torch.manual_seed(0)
    model = VAE.mlp(6, 2, [5], GaussianPrior(2)).double()
    x = (torch.rand(10, 6, generator=torch.Generator().manual_seed(1)) > 0.5).double()
    decomposition.importance_log_likelihood(model, x, 20)
    assert len(calls) == 1
    mu, logvar = torch.randn(30, 2, dtype=torch.float64), torch.zeros(30, 2, dtype=torch.float64)
    decomposition.aggregate_terms(mu, logvar, GaussianPrior(2).double())
    assert len(calls) == 2


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt is Linux's")
def test_pin_is_idempotent():
    assert memory.pin_mmap_threshold() and memory.pin_mmap_threshold()
    assert memory._pinned == memory.MMAP_THRESHOLD


#: Measures a computation's working set: every tensor of 64 KiB or more is mmapped, so freeing
#: it returns it at once, and the peak resident size above the start is what was alive at once.
WORKING_SET = """
import ctypes, sys, torch
assert ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16) == 1  # M_MMAP_THRESHOLD, fixed
torch.set_num_threads(1)
import priors.densities as densities
pairs, entries = (int(v) for v in sys.argv[1:3])
if pairs:
    densities._marginal_budgets = lambda device: (pairs, entries)
gen = torch.Generator().manual_seed(0)
n, d = 20000, 8
mu = torch.randn(n, d, generator=gen, dtype=torch.float64)
logvar = torch.rand(n, d, generator=gen, dtype=torch.float64) * 4 - 6
z = mu + torch.randn(n, d, generator=gen, dtype=torch.float64) * (0.5 * logvar).exp()
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) << 10
open("/proc/self/clear_refs", "w").write("5")  # the high-water mark restarts at the current size
start = hwm()
densities.gaussian_mixture_marginals_logsumexp(z, mu, logvar, method="expand")
print((hwm() - start) >> 20)
"""


@pytest.mark.slow
@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt and /proc are Linux's")
def test_marginals_working_set_follows_the_pass_budgets():
    """M = N = 20,000, D = 8, ~5M pairs: with 2^16 pairs and 2^17 entries a pass, the working
    set stays near the inputs' size (N x D float64 = 1.3 MB each), whatever the pairs' total;
    in one pass of everything it would be over 1 GB."""

    def working_set_mb(pairs, entries):
        out = subprocess.run(
            [sys.executable, "-c", WORKING_SET, str(pairs), str(entries)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=900,
        )
        return int(out.stdout.split()[-1])

    small = working_set_mb(1 << 16, 1 << 17)
    large = working_set_mb(1 << 23, 1 << 22)
    assert small <= 64, small
    assert large >= 4 * small, (small, large)
