"""surgery.text: the one list of estimates (`TERMS`) and the tables made from it."""

from __future__ import annotations

from dataclasses import fields

import pytest

from surgery.decomposition import ESTIMATE_FIELDS, Estimate, SurgeryReport
from surgery.text import TERM, TERMS, format_table, table_rows


def make_report(factorized: bool) -> SurgeryReport:
    """A report with round numbers: avg KL 25 = MI 10 + marginal KL 15 = MI + TC 14 + remainder 1."""
    values = {
        "split": "train",
        "n_points": 50000,
        "n_samples": 50000,
        "elbo": -85.0,
        "reconstruction": -60.0,
        "avg_kl": 25.0,
        "avg_kl_analytic": factorized,
        "mutual_info": 10.0,
        "marginal_kl": 15.0,
        "log_n": 10.8198,
        "identity_gap": 0.0,
        "total_correlation": 14.0,
        "dimwise_kl": 1.0 if factorized else None,
        "prior_mismatch_remainder": 1.0,
        "dimwise_samples": 1000,
        "prior_factorized": factorized,
        "dimwise_kl_per_dim": None,
        "optimal_prior_elbo": -70.0,
        "log_likelihood": -83.0,
        "log_likelihood_split": "test",
        "is_samples": 5000,
        "is_points": 10000,
        "latent_dim": 40,
        "prior": "P",
    }
    for name in ESTIMATE_FIELDS:
        values[f"{name}_stderr"] = None if values[name] is None else (0.0 if name == "avg_kl" and factorized else 0.25)
    return SurgeryReport.from_dict(values)


def test_terms_are_exactly_the_reports_estimates() -> None:
    estimates = [f.name for f in fields(SurgeryReport) if f.type in ("Estimate", "Estimate | None")]
    assert set(ESTIMATE_FIELDS) == set(estimates) == {t.name for t in TERMS}
    assert len(TERMS) == len(estimates) == 11 and "log_n" not in ESTIMATE_FIELDS  # log N is exact, no stderr
    assert all(isinstance(getattr(make_report(True), t.name), Estimate) for t in TERMS)
    assert {t.unit for t in TERMS} == {"nats per data point"}
    assert TERM["marginal_kl"].title == "marginal KL" and TERM["marginal_kl"].depth == 2


@pytest.mark.parametrize("factorized", [True, False])
def test_table_lines_nest_and_show_one_term_beside_tc(factorized: bool) -> None:
    lines = format_table(make_report(factorized)).splitlines()
    third = (
        "        dimension-wise KL                             1.0000 +- 0.2500   (M = 1,000)"
        if factorized
        else "        remainder E[log prod q(z_d) - log p(z)]       1.0000 +- 0.2500   (M = 1,000)"
    )
    avg = "25.0000             (analytic)" if factorized else "25.0000 +- 0.2500   (Monte Carlo)"
    # one number column: the longest label (the remainder's) sets its width, for either prior
    assert lines[1:] == [
        "  ELBO                                              -85.0000 +- 0.2500",
        "    reconstruction E_q[log p(x|z)]                  -60.0000 +- 0.2500",
        f"    average KL                                       {avg}",
        "      index-code mutual info I[n;z]                  10.0000 +- 0.2500   (log N = 10.8198)",
        "      marginal KL(q(z)||p(z))                        15.0000 +- 0.2500",
        "        total correlation                            14.0000 +- 0.2500   (M = 1,000)",
        third,
        "    check: avg KL - (MI + marginal KL)                0.0000 +- 0.2500   (0 up to MC error)",
        "  optimal-prior ELBO (ELBO + marginal KL)           -70.0000 +- 0.2500",
        "  log p(x), test, IS K=5000                         -83.0000 +- 0.2500   (10,000 points)",
    ]
    rows = table_rows(make_report(factorized))
    names = [r[0] for r in rows]
    assert names[6] == ("dimwise_kl" if factorized else "prior_mismatch_remainder")
    assert names[-1] == "log_n" and rows[-1][1:] == [10.8198, 0.0] and len(rows) == 11
