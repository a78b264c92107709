"""Speed and accuracy of the ELBO surgery, measured in one run.

    python bench/surgery_speed.py            # N = M = 50,000, D = 40 (a few minutes on 2 CPU cores)

1. The exact decomposition (aggregate_terms: MI and marginal KL over all M = N samples,
   then TC and dimension-wise KL on `--dimwise-samples` of them, default all M) against a
   baseline in the style of the public beta-TCVAE evaluation code (torch.distributions
   Normal.log_prob broadcast over all N posteriors, 10 samples at a time, logsumexp over
   N, which gives log q(z) and every log q(z_d) together). The baseline is timed on
   `--baseline-rows` samples and extrapolated linearly to M. The per-dimension terms are
   also timed the way they were computed before issue 28 (D one-dimensional float32 direct
   sums, every entry evaluated) on `--old-dimwise-rows` samples, extrapolated to M. All are
   compared with a float64 direct computation on `--ref-rows` samples.
2. Importance-sampled log p(x) (K = 5000) on a subsample of test points, against the
   floor: the decoder's bare forward passes on the same number of latent samples, in the
   same batches. Both are extrapolated to 10,000 points.

Synthetic posteriors shaped like a trained 40-D MNIST VAE's: 15 active dimensions
(means ~ N(0, 1), log-variances uniform in [-7, -3]) and 25 collapsed ones (mean ~ 0,
log-variance ~ 0). The decoder is an untrained 40-300-300-784 MLP (its speed is what matters).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from priors.densities import DiagonalGaussianMixture, gaussian_mixture_marginals_logsumexp  # noqa: E402
from priors.gaussian import GaussianPrior  # noqa: E402
from surgery.decomposition import aggregate_terms, importance_log_likelihood  # noqa: E402
from vae.model import VAE  # noqa: E402


def synthetic_posteriors(n: int, d: int, active: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mu, logvar = torch.zeros(n, d), torch.zeros(n, d)
    a = min(active, d)
    mu[:, :a] = torch.randn(n, a, generator=g)
    logvar[:, :a] = torch.rand(n, a, generator=g) * 4 - 7
    mu[:, a:] = 0.01 * torch.randn(n, d - a, generator=g)
    logvar[:, a:] = 0.01 * torch.randn(n, d - a, generator=g)
    z = mu + torch.exp(0.5 * logvar) * torch.randn(n, d, generator=g)
    return mu, logvar, z


def baseline_log_q(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, batch: int = 10):
    """beta-TCVAE-evaluation style: Normal(mu, std).log_prob broadcast over all N, `batch` samples at a time."""
    normal = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    log_n = math.log(mu.shape[0])
    joint, dims = [], []
    for s in range(0, z.shape[0], batch):
        lp = normal.log_prob(z[s : s + batch, None, :])  # [b, N, D]
        joint.append(torch.logsumexp(lp.sum(-1), dim=1) - log_n)
        dims.append(torch.logsumexp(lp, dim=1) - log_n)
    return torch.cat(joint), torch.cat(dims)


def reference_log_q(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, chunk: int = 20):
    """float64 direct formula, chunked: log q(z) and log q(z_d)."""
    z, mu, logvar = z.double(), mu.double(), logvar.double()
    log_n = math.log(mu.shape[0])
    joint, dims = [], []
    for s in range(0, z.shape[0], chunk):
        lp = -0.5 * (math.log(2 * math.pi) + logvar + (z[s : s + chunk, None, :] - mu) ** 2 * torch.exp(-logvar))
        joint.append(torch.logsumexp(lp.sum(-1), dim=1) - log_n)
        dims.append(torch.logsumexp(lp, dim=1) - log_n)
    return torch.cat(joint), torch.cat(dims)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50_000, help="N = M")
    p.add_argument("--d", type=int, default=40)
    p.add_argument("--active", type=int, default=15)
    p.add_argument("--dimwise-samples", type=int, default=None, help="default: all M")
    p.add_argument("--old-dimwise-rows", type=int, default=1000, help="rows timed for the pre-issue-28 1-D sums")
    p.add_argument("--baseline-rows", type=int, default=200)
    p.add_argument("--ref-rows", type=int, default=200)
    p.add_argument("--is-points", type=int, default=20, help="test points timed (extrapolated to --is-total)")
    p.add_argument("--is-total", type=int, default=10_000)
    p.add_argument("--is-samples", type=int, default=5000)
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the posteriors, prior and decoder live")
    args = p.parse_args()
    torch.manual_seed(0)
    on_gpu = args.device.startswith("cuda")
    where = torch.cuda.get_device_name(args.device) if on_gpu else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, N = M = {args.n:,}, D = {args.d}")

    device = torch.device(args.device)

    def sync() -> None:  # CUDA runs asynchronously: wait for it before reading a clock
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    mu, logvar, z = (t.to(device) for t in synthetic_posteriors(args.n, args.d, args.active))
    prior = GaussianPrior(args.d).to(device)
    index = torch.arange(args.n, device=device)

    # ---- ours: the whole exact decomposition --------------------------------------------
    sync()
    started = time.perf_counter()
    started_cpu = time.process_time()
    terms = aggregate_terms(
        mu,
        logvar,
        prior,
        z,
        index,
        dimwise_samples=args.dimwise_samples,
        generator=torch.Generator(device).manual_seed(0),
    )
    sync()
    ours_total = time.perf_counter() - started
    ours_cpu = time.process_time() - started_cpu
    log_q_ours = terms.marginal_kl_per_sample + prior.log_prob(z).double()
    per_dim_rows = terms.dimwise_samples
    dimwise_full = terms.seconds_dimwise * args.n / per_dim_rows
    print("\n[ours] exact decomposition, one run")
    print(f"  MI + marginal KL (log q(z) at all M = {args.n:,}, over all N): {terms.seconds_aggregate:7.2f} s")
    print(
        f"  TC + dimension-wise KL ({args.d} marginals at {per_dim_rows:,} of the M):   "
        f"{terms.seconds_dimwise:7.2f} s"
        + ("" if per_dim_rows == args.n else f"  (all M: ~{dimwise_full:.0f} s extrapolated)")
    )
    print(
        f"  total:                                                        {ours_total:7.2f} s"
        f"  (process CPU time {ours_cpu:.2f} s)"
    )

    # The per-dimension sums as before issue 28: D float32 direct sums, every entry evaluated.
    old_rows = torch.arange(min(args.old_dimwise_rows, args.n), device=device)
    sync()
    started = time.perf_counter()
    started_cpu = time.process_time()
    with torch.inference_mode():
        old_dims = torch.stack(
            [
                DiagonalGaussianMixture(
                    mu[:, j : j + 1].contiguous(), logvar[:, j : j + 1].contiguous(), small_components=0
                ).log_prob(z[old_rows, j : j + 1].contiguous(), out_dtype=torch.float64)
                for j in range(args.d)
            ],
            -1,
        )
    sync()
    old_time = time.perf_counter() - started
    old_cpu = time.process_time() - started_cpu
    old_full = old_time * args.n / len(old_rows)
    print(
        f"  the same before issue 28 (float32 direct sums, every entry): {old_time:.2f} s (process CPU time "
        f"{old_cpu:.2f} s) for {len(old_rows):,} rows -> ~{old_full:.0f} s for all M (extrapolated); "
        f"now/before {dimwise_full / old_full:.3f}"
    )
    print(
        f"  MI = {terms.mutual_info.value:.4f} +- {terms.mutual_info.stderr:.4f}, marginal KL = "
        f"{terms.marginal_kl.value:.4f} "
        f"+- {terms.marginal_kl.stderr:.4f}, TC = {terms.total_correlation.value:.4f} +- "
        f"{terms.total_correlation.stderr:.4f}, "
        f"log N = {math.log(args.n):.4f}"
    )

    # ---- the baseline, on a subsample, extrapolated ---------------------------------------
    rows = torch.arange(args.baseline_rows, device=device)
    sync()
    started = time.perf_counter()
    base_joint, base_dims = baseline_log_q(z[rows], mu, logvar)
    sync()
    base_time = time.perf_counter() - started
    base_full = base_time * args.n / args.baseline_rows
    print(
        f"\n[baseline] torch.distributions broadcast, 10 samples at a time: {base_time:.2f} s for "
        f"{args.baseline_rows} samples"
        f" -> {base_full:.0f} s for M = {args.n:,} (linear extrapolation; gives log q(z) and all log q(z_d))"
    )

    # ---- accuracy against float64 -------------------------------------------------------------
    ref_rows = torch.arange(args.ref_rows, device=device)
    ref_joint, ref_dims = reference_log_q(z[ref_rows], mu, logvar)
    err_ours = (log_q_ours[ref_rows] - ref_joint).abs().max().item()
    err_base = (base_joint[: args.ref_rows].double() - ref_joint).abs().max().item()
    err_base_dims = (base_dims[: args.ref_rows].double() - ref_dims).abs().max().item()
    # Our per-dimension values (a point's value does not depend on the other points).
    ours_dims = gaussian_mixture_marginals_logsumexp(z[ref_rows], mu, logvar) - math.log(args.n)
    err_ours_dims = (ours_dims - ref_dims).abs().max().item()
    n_old = min(args.ref_rows, len(old_rows))
    err_old_dims = (old_dims[:n_old] - ref_dims[:n_old]).abs().max().item()  # both normalized
    print(f"\n[accuracy] max |error| vs float64 on {args.ref_rows} samples:")
    print(f"  log q(z):   ours {err_ours:.2e} nats, baseline {err_base:.2e} nats")
    print(
        f"  log q(z_d): ours {err_ours_dims:.2e} nats, baseline {err_base_dims:.2e} nats, "
        f"before issue 28 {err_old_dims:.2e} nats"
    )
    print(
        f"\n[summary] MI/marginal-KL kernel: ours {terms.seconds_aggregate:.2f} s vs baseline {base_full:.0f} s "
        f"-> {base_full / terms.seconds_aggregate:.0f}x; whole decomposition {ours_total:.2f} s "
        f"-> {base_full / ours_total:.0f}x (baseline also yields the per-dimension terms at all M)"
    )

    # ---- importance-sampled log-likelihood vs the decoder floor -------------------------------
    model = VAE.mlp(784, args.d, [300, 300], GaussianPrior(args.d)).eval().to(device)
    x = torch.bernoulli(torch.full((args.is_points, 784), 0.13), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        importance_log_likelihood(model, x[:1], 100)  # warm-up
        sync()
        started = time.perf_counter()
        importance_log_likelihood(model, x, args.is_samples)
        sync()
        is_time = time.perf_counter() - started
        # the floor: bare decoder passes over the same number of latent samples, same batch shape
        per_call = 2_000_000 // 784
        s = min(args.is_samples, per_call)
        b = max(1, per_call // s)
        z_batch = torch.randn(b, s, args.d, device=device)
        calls = math.ceil(args.is_points / b) * math.ceil(args.is_samples / s)
        sync()
        started = time.perf_counter()
        for _ in range(calls):
            model.decode(z_batch)
        sync()
        floor_time = time.perf_counter() - started
    scale = args.is_total / args.is_points
    print(
        f"\n[log p(x)] K = {args.is_samples}, {args.is_points} test points timed, extrapolated to {args.is_total:,} "
        f"({args.is_total * args.is_samples / 1e6:.0f} million latent samples):"
    )
    print(
        f"  importance sampling {is_time * scale:.0f} s, decoder forward floor {floor_time * scale:.0f} s "
        f"-> ratio {is_time / floor_time:.2f}x"
    )


if __name__ == "__main__":
    main()
