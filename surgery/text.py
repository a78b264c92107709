"""A `SurgeryReport` as text, and the one list of its estimates.

`TERMS` names every estimate of a `SurgeryReport` once: its field (also its surgery.json key,
with `_stderr` beside it), its place in every table, its unit, its column title and its label.
The plain-text table printed by `python -m surgery` and train.py (`format_table`), the
logger's `[term, value, stderr]` rows (`table_rows`) and the columns of
`python -m surgery.report` all read it; which fields are estimates is read off the dataclass
(`surgery.decomposition.ESTIMATE_FIELDS`), and a test checks the two agree. Presentation
only; the numbers come from `surgery.decomposition`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from surgery.decomposition import Estimate, SurgeryReport


@dataclass(frozen=True)
class Term:
    """How one estimate of a `SurgeryReport` is named and shown."""

    name: str  # the SurgeryReport field and surgery.json key (`name`, `name_stderr`)
    title: str  # a short column title
    label: str  # the printed table's label
    depth: int  # how deep the term nests in ELBO = reconstruction - (MI + (TC + remainder))
    unit: str = "nats per data point"
    #: In the report's table over runs. The identity gap is a check (zero up to Monte Carlo error);
    #: the remainder is marginal KL - TC, and equals the dimension-wise KL where that exists.
    in_report: bool = True


#: Every estimate, in the order every table shows them.
TERMS: tuple[Term, ...] = (
    Term("elbo", "ELBO", "ELBO", 0),
    Term("reconstruction", "reconstruction", "reconstruction E_q[log p(x|z)]", 1),
    Term("avg_kl", "avg KL", "average KL", 1),
    Term("mutual_info", "MI", "index-code mutual info I[n;z]", 2),
    Term("marginal_kl", "marginal KL", "marginal KL(q(z)||p(z))", 2),
    Term("total_correlation", "TC", "total correlation", 3),
    Term("dimwise_kl", "dim-wise KL", "dimension-wise KL", 3),
    Term("prior_mismatch_remainder", "remainder", "remainder E[log prod q(z_d) - log p(z)]", 3, in_report=False),
    Term("identity_gap", "identity gap", "check: avg KL - (MI + marginal KL)", 1, in_report=False),
    Term("optimal_prior_elbo", "optimal-prior ELBO", "optimal-prior ELBO (ELBO + marginal KL)", 0),
    Term("log_likelihood", "test log p(x)", "log p(x)", 0),
)
#: The terms by field name.
TERM: dict[str, Term] = {t.name: t for t in TERMS}


def shown_terms(report: SurgeryReport) -> list[Term]:
    """The terms a table of `report` shows, in order: those it has, and the prior-mismatch
    remainder only where there is no dimension-wise KL (where both exist they are one number)."""
    return [
        t
        for t in TERMS
        if getattr(report, t.name) is not None
        and not (t.name == "prior_mismatch_remainder" and report.dimwise_kl is not None)
    ]


def table_rows(report: SurgeryReport) -> list[list[Any]]:
    """`[name, value, stderr]` rows of the decomposition (for a logger's table), in the order of
    `format_table`, then `log_n` (exact: stderr 0)."""
    rows: list[list[Any]] = []
    for term in shown_terms(report):
        estimate = getattr(report, term.name)
        rows.append([term.name, estimate.value, estimate.stderr])
    rows.append(["log_n", report.log_n, 0.0])
    return rows


def _note(report: SurgeryReport, name: str) -> str:
    """What the printed table says beside a term: how it was computed, or what bounds it."""
    r = report
    if name == "avg_kl":
        return "(analytic)" if r.avg_kl_analytic else "(Monte Carlo)"
    if name == "mutual_info":
        return f"(log N = {r.log_n:.4f})"
    if name in ("total_correlation", "dimwise_kl", "prior_mismatch_remainder"):
        return f"(M = {r.dimwise_samples:,})"
    if name == "identity_gap":
        return "(0 up to MC error)"
    if name == "log_likelihood":
        return f"({r.is_points:,} points)"
    return ""


def format_table(report: SurgeryReport) -> str:
    """A readable plain-text table, one line per term, indented by how the terms nest."""
    r = report
    lines = [
        f"ELBO surgery on the {r.split} split: N = {r.n_points:,} points, M = {r.n_samples:,} samples "
        f"of z, prior {r.prior}, {r.latent_dim}-D latents (nats per data point, +- one standard error)",
    ]
    width = max(len("  " * t.depth + t.label) for t in TERMS)  # every label fits: the numbers line up
    for term in shown_terms(r):
        estimate: Estimate = getattr(r, term.name)
        label = term.label
        if term.name == "log_likelihood":
            label = f"{label}, {r.log_likelihood_split}, IS K={r.is_samples}"
        se = "" if estimate.stderr is None or estimate.stderr == 0 else f" +- {estimate.stderr:.4f}"
        label = "  " * term.depth + label
        lines.append(f"  {label:<{width}} {estimate.value:>12.4f}{se:<12} {_note(r, term.name)}".rstrip())
    return "\n".join(lines)
