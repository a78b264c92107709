"""A `SurgeryReport` as text: the plain-text table printed by `python -m surgery` and train.py,
and the `[term, value, stderr]` rows of the logger's table. Presentation only; the numbers
come from `surgery.decomposition`."""

from __future__ import annotations

from typing import Any

from surgery.decomposition import Estimate, SurgeryReport


def _third_term(report: SurgeryReport) -> tuple[str, str, Estimate]:
    """(field, label, estimate) of the term beside TC: the dimension-wise KL for a factorized prior,
    else the prior-mismatch remainder (the same number where both exist)."""
    if report.dimwise_kl is not None:
        return "dimwise_kl", "dimension-wise KL", report.dimwise_kl
    return "prior_mismatch_remainder", "remainder E[log prod q(z_d) - log p(z)]", report.prior_mismatch_remainder


def table_rows(report: SurgeryReport) -> list[list[Any]]:
    """`[name, value, stderr]` rows of the decomposition (for a logger's table), in the order of
    `format_table`; the term beside TC is the one `_third_term` picks."""
    third, _, _ = _third_term(report)
    names = (
        "elbo",
        "reconstruction",
        "avg_kl",
        "mutual_info",
        "marginal_kl",
        "total_correlation",
        third,
        "optimal_prior_elbo",
        "log_likelihood",
    )
    rows = []
    for name in names:
        estimate = getattr(report, name)
        if estimate is not None:
            rows.append([name, estimate.value, estimate.stderr])
    rows.append(["log_n", report.log_n, 0.0])
    rows.append(["identity_gap", report.identity_gap.value, report.identity_gap.stderr])
    return rows


def format_table(report: SurgeryReport) -> str:
    """A readable plain-text table, one line per term, indented by how the terms nest."""
    r = report
    lines = [
        f"ELBO surgery on the {r.split} split: N = {r.n_points:,} points, M = {r.n_samples:,} samples "
        f"of z, prior {r.prior}, {r.latent_dim}-D latents (nats per data point, +- one standard error)",
    ]

    def row(label: str, estimate: Estimate | None, note: str = "") -> None:
        if estimate is None:
            return
        se = "" if estimate.stderr is None or estimate.stderr == 0 else f" +- {estimate.stderr:.4f}"
        lines.append(f"  {label:<38} {estimate.value:>12.4f}{se:<12} {note}".rstrip())

    _, third_label, third = _third_term(r)
    row("ELBO", r.elbo)
    row("  reconstruction E_q[log p(x|z)]", r.reconstruction)
    row("  average KL", r.avg_kl, "(analytic)" if r.avg_kl_analytic else "(Monte Carlo)")
    row("    index-code mutual info I[n;z]", r.mutual_info, f"(log N = {r.log_n:.4f})")
    row("    marginal KL(q(z)||p(z))", r.marginal_kl)
    row("      total correlation", r.total_correlation, f"(M = {r.dimwise_samples:,})")
    row(f"      {third_label}", third, f"(M = {r.dimwise_samples:,})")
    row("  check: avg KL - (MI + marginal KL)", r.identity_gap, "(0 up to MC error)")
    row("optimal-prior ELBO (ELBO + marginal KL)", r.optimal_prior_elbo)
    if r.log_likelihood is not None:
        row(
            f"log p(x), {r.log_likelihood_split}, IS K={r.is_samples}",
            r.log_likelihood,
            f"({r.is_points:,} points)",
        )
    return "\n".join(lines)
