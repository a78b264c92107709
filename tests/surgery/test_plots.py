"""surgery/plots.py: each picture shows the report's numbers (bars, whiskers, lines and densities read back from
the figure), and the module leaves matplotlib's global state alone."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure

import surgery.plots as plots
from priors.gaussian import GaussianPrior
from surgery.decomposition import ESTIMATE_FIELDS, Estimate, SurgeryReport
from surgery.plots import LOG_DENSITY_RANGE, plot_aggregate_posterior_2d, plot_by_size, plot_decomposition

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def make_report(factorized: bool, log_likelihood: float | None = -83.0) -> SurgeryReport:
    values = {
        "split": "train",
        "n_points": 1000,
        "n_samples": 1000,
        "elbo": -85.0,
        "reconstruction": -60.0,
        "avg_kl": 25.0,
        "avg_kl_analytic": factorized,
        "mutual_info": 6.5,
        "marginal_kl": 18.5,
        "log_n": math.log(1000),
        "identity_gap": 0.0,
        "total_correlation": 14.0,
        "dimwise_kl": 4.5 if factorized else None,
        "prior_mismatch_remainder": 4.5 if factorized else 3.0,
        "dimwise_samples": 100,
        "prior_factorized": factorized,
        "dimwise_kl_per_dim": None,
        "optimal_prior_elbo": -66.5,
        "log_likelihood": log_likelihood,
        "log_likelihood_split": None if log_likelihood is None else "test",
        "is_samples": None if log_likelihood is None else 500,
        "is_points": None if log_likelihood is None else 100,
        "latent_dim": 2,
        "prior": "GaussianPrior",
    }
    for i, name in enumerate(ESTIMATE_FIELDS):
        values[f"{name}_stderr"] = None if values[name] is None else 0.1 * (i + 1)
    return SurgeryReport.from_dict(values)


@pytest.fixture
def figures(monkeypatch) -> list[Figure]:
    """The figures the module makes, kept and not rendered (rendering is matplotlib's, and slow)."""
    made: list[Figure] = []

    class Kept(Figure):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

        def savefig(self, path, **kwargs) -> None:
            self.saved_to = path

        def tight_layout(self, *args, **kwargs) -> None:
            pass

    monkeypatch.setattr(plots, "new_figure", lambda width, height, **options: Kept(figsize=(width, height), **options))
    return made


def bars(ax) -> list[tuple[str, float, float]]:
    """(label, height, whisker half-length) of each bar of `ax`."""
    (bar_container,) = [c for c in ax.containers if type(c).__name__ == "BarContainer"]
    (errorbar,) = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    segments = errorbar.lines[2][0].get_segments()
    labels = [t.get_text() for t in ax.get_xticklabels()]
    return [
        (label, patch.get_height(), (seg[1][1] - seg[0][1]) / 2)
        for label, patch, seg in zip(labels, bar_container.patches, segments, strict=True)
    ]


@pytest.mark.parametrize("factorized", [True, False])
def test_decomposition_bars_are_the_reports_estimates_with_their_standard_errors(figures, factorized: bool) -> None:
    report = make_report(factorized)
    assert plot_decomposition(report, "d.png") == Path("d.png")
    (fig,) = figures
    ax_kl, ax_bound = fig.axes
    third = ("dim-wise KL", report.dimwise_kl) if factorized else ("remainder", report.prior_mismatch_remainder)
    want = [
        ("average KL", report.avg_kl),
        ("mutual info", report.mutual_info),
        ("marginal KL", report.marginal_kl),
        ("total corr.", report.total_correlation),
        third,
    ]
    got = bars(ax_kl)
    assert [g[0] for g in got] == [w[0] for w in want]
    for (_, height, whisker), (_, estimate) in zip(got, want, strict=True):
        assert height == pytest.approx(estimate.value) and whisker == pytest.approx(estimate.stderr)
    (log_n,) = [line for line in ax_kl.get_lines() if line.get_label().startswith("log N")]
    assert list(log_n.get_ydata()) == [report.log_n] * 2
    got = bars(ax_bound)
    assert [g[0] for g in got] == ["ELBO", "optimal-prior\nELBO", "log p(x)\ntest, K=500"]
    for (_, height, whisker), estimate in zip(
        got, [report.elbo, report.optimal_prior_elbo, report.log_likelihood], strict=True
    ):
        assert height == pytest.approx(estimate.value) and whisker == pytest.approx(estimate.stderr)
    # padded by half the bars' spread (at least a nat), and never above 0 (every bound is a log probability)
    pad = 0.5 * (report.optimal_prior_elbo.value - report.elbo.value)
    assert ax_bound.get_ylim() == pytest.approx((report.elbo.value - pad, report.optimal_prior_elbo.value + pad))


def test_without_a_log_likelihood_there_are_two_bounds_and_the_axis_stops_at_0(figures) -> None:
    report = dataclasses.replace(
        make_report(True, log_likelihood=None), elbo=Estimate(-3.0, 0.1), optimal_prior_elbo=Estimate(-0.5, 0.1)
    )
    plot_decomposition(report, "d.png")
    ax_bound = figures[0].axes[1]
    assert [b[0] for b in bars(ax_bound)] == ["ELBO", "optimal-prior\nELBO"]
    assert ax_bound.get_ylim() == pytest.approx((-4.25, 0.0))


def test_the_decomposition_is_saved_as_a_png(tmp_path: Path) -> None:
    path = plot_decomposition(make_report(False), tmp_path / "d.png")
    assert path.read_bytes()[:8] == PNG


def test_the_2d_picture_shows_log_q_and_log_p_on_one_floored_scale(figures) -> None:
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(5, 2, generator=g, dtype=torch.float64) * 2
    logvar = torch.randn(5, 2, generator=g, dtype=torch.float64) * 0.3 - 1.0
    prior = GaussianPrior(2).double()
    plot_aggregate_posterior_2d(mu, logvar, prior, "q.png", grid=7, n_scatter=50)
    (fig,) = figures
    ax_q, ax_p = fig.axes[:2]
    xs = torch.linspace(*ax_q.get_xlim(), 7, dtype=torch.float64)
    ys = torch.linspace(*ax_q.get_ylim(), 7, dtype=torch.float64)
    log_q, log_p = torch.empty(7, 7, dtype=torch.float64), torch.empty(7, 7, dtype=torch.float64)
    for i, y in enumerate(ys.tolist()):
        for j, x in enumerate(xs.tolist()):
            densities = [
                math.exp(
                    sum(
                        -0.5 * (math.log(2 * math.pi) + lv + (v - m) ** 2 / math.exp(lv))
                        for v, m, lv in zip((x, y), mu[n].tolist(), logvar[n].tolist(), strict=True)
                    )
                )
                for n in range(5)
            ]
            log_q[i, j] = math.log(sum(densities) / 5)
            log_p[i, j] = -math.log(2 * math.pi) - 0.5 * (x * x + y * y)
    vmax = max(log_q.max().item(), log_p.max().item())
    for ax, want in [(ax_q, log_q), (ax_p, log_p)]:
        (mesh,) = ax.collections[:1]
        assert mesh.get_clim() == pytest.approx((vmax - LOG_DENSITY_RANGE, vmax))
        shown = torch.as_tensor(mesh.get_array().reshape(7, 7), dtype=torch.float64)
        torch.testing.assert_close(shown, want.clamp(min=vmax - LOG_DENSITY_RANGE), rtol=0, atol=1e-9)
    assert ax_p.get_title() == "prior p(z) (GaussianPrior)"


def test_the_2d_picture_needs_2d_latents() -> None:
    with pytest.raises(ValueError, match="plot_aggregate_posterior_2d needs 2-D latents, got 3-D"):
        plot_aggregate_posterior_2d(torch.zeros(4, 3), torch.zeros(4, 3), GaussianPrior(3), "q.png")


def test_the_by_size_picture_draws_each_term_against_m_with_log_m(figures) -> None:
    rows = [
        {"m": m, "log_m": math.log(m), "avg_kl_mc": 20.0 + i, **{f"{t}_stderr": 0.1 for t in TERMS}}
        | {t: float(10 * i + k) for k, t in enumerate(TERMS) if t != "avg_kl_mc"}
        for i, m in enumerate([100, 300, 1000])
    ]
    content = {"rows": rows, "prior_factorized": False, "split": "train", "prior": "MixturePrior", "latent_dim": 2}
    plot_by_size(content, "b.png")
    ((ax,),) = [f.axes for f in figures]
    assert ax.get_xscale() == "log"
    handles, labels = ax.get_legend_handles_labels()
    lines = {label: getattr(h, "lines", [h])[0] for h, label in zip(handles, labels, strict=True)}
    assert sorted(labels) == sorted(
        ["average KL", "mutual info", "marginal KL", "total correlation", "remainder", "log M", "average KL - log M"]
    )
    for label, key in [("mutual info", "mutual_info"), ("remainder", "prior_mismatch_remainder")]:
        assert list(lines[label].get_ydata()) == [r[key] for r in rows]
    assert list(lines["log M"].get_xdata()) == [100, 300, 1000]
    assert list(lines["log M"].get_ydata()) == pytest.approx([math.log(m) for m in (100, 300, 1000)])
    assert list(lines["average KL - log M"].get_ydata()) == pytest.approx([r["avg_kl_mc"] - r["log_m"] for r in rows])


TERMS = ("mutual_info", "marginal_kl", "avg_kl_mc", "total_correlation", "prior_mismatch_remainder")


@pytest.mark.slow  # a Python process of its own, to see matplotlib's state as a fresh import leaves it
def test_surgery_modules_select_no_matplotlib_backend(tmp_path):
    """Importing the surgery modules leaves matplotlib's backend alone (no matplotlib.use, no pyplot),
    and the pictures still come out as PNGs."""
    content = json.dumps(make_report(False).to_dict())
    script = f"""
import sys, matplotlib, json
import surgery, surgery.plots, surgery.text, lab.surgery, lab.report, lab.fit, lab.pictures, lab.by_size
assert matplotlib.get_backend().lower() == "svg", matplotlib.get_backend()
from surgery import SurgeryReport
from surgery.plots import plot_decomposition
report = SurgeryReport.from_dict(json.loads({content!r}))
path = plot_decomposition(report, {str(tmp_path / "d.png")!r})
assert "matplotlib.pyplot" not in sys.modules
print(open(path, "rb").read(8).hex())
"""
    env = {**os.environ, "MPLBACKEND": "svg", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert bytes.fromhex(done.stdout.strip()) == PNG
