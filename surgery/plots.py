"""Pictures of one surgery report: the decomposition as bars, for 2-D latents q(z) beside p(z), and
a model's samples and reconstructions.

Figures are `matplotlib.figure.Figure`s saved with `savefig`: no pyplot state and no backend
to select, so importing this module changes nothing global and it is safe in worker processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from priors.base import Prior
from priors.densities import DiagonalGaussianMixture, reparameterize
from surgery.decomposition import SurgeryReport

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def new_figure(width: float, height: float, **options: Any) -> Figure:
    """A matplotlib Figure (no pyplot, no backend), matplotlib imported on first use: a command
    that draws nothing does not pay its import (about half a second)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), **options)


def plot_decomposition(report: SurgeryReport, path: str | Path) -> Path:
    """Bars of the KL terms (left) and of the bounds (right), with one-standard-error whiskers."""
    path = Path(path)
    fig = new_figure(11, 4)
    ax_kl, ax_bound = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    if report.dimwise_kl is not None:
        third = ("dim-wise KL", report.dimwise_kl)
    else:
        third = ("remainder", report.prior_mismatch_remainder)
    kl_terms = [
        (label, e.value, e.stderr)
        for label, e in [
            ("average KL", report.avg_kl),
            ("mutual info", report.mutual_info),
            ("marginal KL", report.marginal_kl),
            ("total corr.", report.total_correlation),
            third,
        ]
    ]
    colors = ["#4c72b0", "#55a868", "#c44e52", "#dd8452", "#8172b3"]
    ax_kl.bar(
        [t[0] for t in kl_terms], [t[1] for t in kl_terms], yerr=[t[2] for t in kl_terms], color=colors, capsize=4
    )
    ax_kl.axhline(report.log_n, color="k", ls="--", lw=1, label=f"log N = {report.log_n:.2f}")
    for i, (_, value, _) in enumerate(kl_terms):
        ax_kl.annotate(f"{value:.2f}", (i, value), ha="center", va="bottom", fontsize=8)
    ax_kl.set_ylabel("nats per data point")
    ax_kl.set_title(f"average KL = MI + marginal KL ({report.split}, N = {report.n_points:,})")
    ax_kl.legend(loc="upper right", fontsize=8)

    bounds = [
        ("ELBO", report.elbo.value, report.elbo.stderr),
        ("optimal-prior\nELBO", report.optimal_prior_elbo.value, report.optimal_prior_elbo.stderr),
    ]
    if report.log_likelihood is not None:
        bounds.append(
            (
                f"log p(x)\n{report.log_likelihood_split}, K={report.is_samples}",
                report.log_likelihood.value,
                report.log_likelihood.stderr,
            )
        )
    ax_bound.bar(
        [b[0] for b in bounds], [b[1] for b in bounds], yerr=[b[2] for b in bounds], color="#937860", capsize=4
    )
    low = min(b[1] for b in bounds)
    high = max(b[1] for b in bounds)
    pad = max(1.0, 0.5 * (high - low))
    ax_bound.set_ylim(low - pad, min(0.0, high + pad))
    for i, (_, value, _) in enumerate(bounds):
        ax_bound.annotate(f"{value:.2f}", (i, value), ha="center", va="bottom", fontsize=8)
    ax_bound.set_title(f"bounds ({report.prior}, {report.latent_dim}-D)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


LOG_DENSITY_RANGE = 12.0  # nats of log density the 2-D picture shows below its peak


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
    q_samples = reparameterize(mu[pick], logvar[pick], g)
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
    log_q, log_p = log_q.view(grid, grid), log_p.view(grid, grid)
    # Log density on one shared scale, floored LOG_DENSITY_RANGE nats below the higher peak:
    # on a linear scale a broad prior is invisible beside q(z)'s sharp peaks.
    vmax = float(max(log_q.max(), log_p.max()))
    vmin = vmax - LOG_DENSITY_RANGE
    fig = new_figure(10, 4.6)
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    for ax, dens, title in [
        (axes[0], log_q, "aggregate posterior q(z)"),
        (axes[1], log_p, f"prior p(z) ({type(prior).__name__})"),
    ]:
        mesh = ax.pcolormesh(
            gx.numpy(), gy.numpy(), dens.clamp(min=vmin).numpy(), shading="auto", cmap="magma", vmin=vmin, vmax=vmax
        )
        ax.contour(
            gx.numpy(),
            gy.numpy(),
            dens.numpy(),
            levels=[vmax - 8, vmax - 4, vmax - 2],
            colors="white",
            linewidths=0.6,
            alpha=0.7,
        )
        ax.set_title(title)
        ax.set_xlabel("z1")
        ax.set_aspect("equal")
    axes[0].set_ylabel("z2")
    axes[0].set_xlim(float(lo[0]), float(hi[0]))
    axes[0].set_ylim(float(lo[1]), float(hi[1]))
    fig.colorbar(mesh, ax=axes, shrink=0.85, label="log density (nats; contours 2, 4, 8 below the peak)")
    fig.savefig(path, dpi=110)
    return path


def plot_by_size(content: dict, path: str | Path) -> Path:
    """The terms of `python -m surgery.by_size` against M on a log axis, with log M and average KL - log M."""
    path = Path(path)
    rows = content["rows"]
    m = [r["m"] for r in rows]
    fig = new_figure(7, 4.5)
    ax = fig.subplots()
    third = "dimension-wise KL" if content["prior_factorized"] else "remainder"
    for name, label, color in [
        ("avg_kl_mc", "average KL", "#4c72b0"),
        ("mutual_info", "mutual info", "#55a868"),
        ("marginal_kl", "marginal KL", "#c44e52"),
        ("total_correlation", "total correlation", "#dd8452"),
        ("prior_mismatch_remainder", third, "#8172b3"),
    ]:
        values = [r[name] for r in rows]
        errors = [r[f"{name}_stderr"] for r in rows]
        ax.errorbar(m, values, yerr=errors, marker="o", ms=3, capsize=2, color=color, label=label)
    # Drawn on top: where the posteriors do not overlap, MI lies on log M and marginal KL on this line.
    ax.plot(m, [r["log_m"] for r in rows], "k--", lw=1, zorder=5, label="log M")
    ax.plot(m, [r["avg_kl_mc"] - r["log_m"] for r in rows], "k:", lw=1.2, zorder=5, label="average KL - log M")
    ax.set_xscale("log")
    ax.set_xlabel(f"M, points of the {content['split']} split in q(z)")
    ax.set_ylabel("nats per data point")
    ax.set_title(f"surgery against size ({content['prior']}, {content['latent_dim']}-D)")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
