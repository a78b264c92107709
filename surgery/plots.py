"""Pictures of a surgery report: the decomposition as bars, and for 2-D latents q(z) beside p(z)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from priors.base import Prior  # noqa: E402
from priors.densities import DiagonalGaussianMixture  # noqa: E402
from surgery.decomposition import SurgeryReport  # noqa: E402


def plot_decomposition(report: SurgeryReport, path: str | Path) -> Path:
    """Bars of the KL terms (left) and of the bounds (right), with one-standard-error whiskers."""
    path = Path(path)
    fig, (ax_kl, ax_bound) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    dimwise = "dim-wise KL" if report.prior_factorized else "remainder"
    kl_terms = [
        ("average KL", report.avg_kl, report.avg_kl_stderr),
        ("mutual info", report.mutual_info, report.mutual_info_stderr),
        ("marginal KL", report.marginal_kl, report.marginal_kl_stderr),
        ("total corr.", report.total_correlation, report.total_correlation_stderr),
        (dimwise, report.dimwise_kl, report.dimwise_kl_stderr),
    ]
    colors = ["#4c72b0", "#55a868", "#c44e52", "#dd8452", "#8172b3"]
    ax_kl.bar([t[0] for t in kl_terms], [t[1] for t in kl_terms], yerr=[t[2] for t in kl_terms], color=colors, capsize=4)
    ax_kl.axhline(report.log_n, color="k", ls="--", lw=1, label=f"log N = {report.log_n:.2f}")
    for i, (_, value, _) in enumerate(kl_terms):
        ax_kl.annotate(f"{value:.2f}", (i, value), ha="center", va="bottom", fontsize=8)
    ax_kl.set_ylabel("nats per data point")
    ax_kl.set_title(f"average KL = MI + marginal KL ({report.split}, N = {report.n_points:,})")
    ax_kl.legend(loc="upper right", fontsize=8)

    bounds = [("ELBO", report.elbo, report.elbo_stderr), ("optimal-prior\nELBO", report.optimal_prior_elbo, report.optimal_prior_elbo_stderr)]
    if report.log_likelihood is not None:
        bounds.append((f"log p(x)\n{report.log_likelihood_split}, K={report.is_samples}", report.log_likelihood, report.log_likelihood_stderr))
    ax_bound.bar([b[0] for b in bounds], [b[1] for b in bounds], yerr=[b[2] for b in bounds], color="#937860", capsize=4)
    low = min(b[1] for b in bounds)
    high = max(b[1] for b in bounds)
    pad = max(1.0, 0.5 * (high - low))
    ax_bound.set_ylim(low - pad, min(0.0, high + pad))
    for i, (_, value, _) in enumerate(bounds):
        ax_bound.annotate(f"{value:.2f}", (i, value), ha="center", va="bottom", fontsize=8)
    ax_bound.set_title(f"bounds ({report.prior}, {report.latent_dim}-D)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@torch.inference_mode()
def plot_aggregate_posterior_2d(
    mu: Tensor,
    logvar: Tensor,
    prior: Prior,
    path: str | Path,
    *,
    grid: int = 120,
    n_scatter: int = 2000,
    seed: int = 0,
) -> Path:
    """q(z) = 1/N sum_n q(z|x_n) beside p(z) on one grid and one colour scale, with samples of each."""
    if mu.shape[1] != 2:
        raise ValueError(f"plot_aggregate_posterior_2d needs 2-D latents, got {mu.shape[1]}-D")
    path = Path(path)
    g = torch.Generator(device=mu.device).manual_seed(seed)
    pick = torch.randperm(mu.shape[0], generator=g, device=mu.device)[:n_scatter]
    q_samples = mu[pick] + torch.exp(0.5 * logvar[pick]) * torch.randn(mu[pick].shape, generator=g, device=mu.device, dtype=mu.dtype)
    p_samples = prior.sample(n_scatter).to(mu.dtype)
    both = torch.cat([q_samples, p_samples]).double().cpu()
    lo = torch.quantile(both, 0.005, dim=0)
    hi = torch.quantile(both, 0.995, dim=0)
    span = hi - lo
    lo, hi = lo - 0.1 * span, hi + 0.1 * span
    xs = torch.linspace(float(lo[0]), float(hi[0]), grid, dtype=torch.float64)
    ys = torch.linspace(float(lo[1]), float(hi[1]), grid, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    points = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)
    log_q = DiagonalGaussianMixture(mu, logvar).log_prob(points.to(mu.device, mu.dtype), out_dtype=torch.float64).cpu()
    log_p = prior.log_prob(points.to(mu.device, mu.dtype)).double().cpu()
    dens_q, dens_p = log_q.exp().view(grid, grid), log_p.exp().view(grid, grid)
    vmax = float(max(dens_q.max(), dens_p.max()))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharex=True, sharey=True)
    for ax, dens, samples, title in [
        (axes[0], dens_q, q_samples, "aggregate posterior q(z)"),
        (axes[1], dens_p, p_samples, f"prior p(z) ({type(prior).__name__})"),
    ]:
        mesh = ax.pcolormesh(gx.numpy(), gy.numpy(), dens.numpy(), shading="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        s = samples.double().cpu().numpy()
        ax.scatter(s[:, 0], s[:, 1], s=1, c="white", alpha=0.35, linewidths=0)
        ax.set_title(title)
        ax.set_xlabel("z1")
    axes[0].set_ylabel("z2")
    axes[0].set_xlim(float(lo[0]), float(hi[0]))
    axes[0].set_ylim(float(lo[1]), float(hi[1]))
    fig.colorbar(mesh, ax=axes, shrink=0.85, label="density (same scale)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
