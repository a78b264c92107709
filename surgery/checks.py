"""Figures no correct model can produce, found before they are reported as results.

priorlab's decoder is Bernoulli: log p(x|z) = sum_p x_p l_p - softplus(l_p) <= 0 for every
pixel value x_p in [0, 1] (binary pixels, or grey levels read as probabilities). So on such
data log p(x) <= 0 and every ELBO <= log p(x) <= 0, and a KL divergence is never negative.
A positive ELBO or log p(x), or a negative marginal KL, beyond its Monte Carlo error, means
the model is wrong (most often a prior whose log_prob is not normalized, or a prior that
holds the very points it is evaluated on); it is reported as that, never as a result.

`check_run_results` is what `train.py` calls after its final evaluation; `python -m
priors.fit` applies the same tests to the figures it reports (lab/fit.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

#: Standard errors a figure must be past its bound by to count as impossible.
IMPOSSIBLE_Z = 4.0
#: Nats of slack for rounding: an exact aggregate-posterior prior has a marginal KL of 0 up to it.
ROUNDING_NATS = 1e-6


class ImpossibleResultError(ValueError):
    """A run or a fit produced figures that no correct model can give on its data."""


def beyond(value: float, bound: float, stderr: float | None, above: bool) -> bool:
    """Whether `value` is past `bound` (above it, or below it) by more than IMPOSSIBLE_Z standard errors."""
    margin = ROUNDING_NATS + (IMPOSSIBLE_Z * stderr if stderr is not None and stderr == stderr else 0.0)
    return value - margin > bound if above else value + margin < bound


def in_unit_interval(x: torch.Tensor) -> bool:
    """Whether every value of `x` lies in [0, 1], where a Bernoulli log-likelihood is <= 0."""
    return bool(x.numel() == 0 or (x.min() >= 0 and x.max() <= 1))


def describe(name: str, value: float, stderr: float | None) -> str:
    spread = f" ± {stderr:.2g}" if stderr is not None and stderr == stderr else ""
    return f"{name} {value:+.4g}{spread} nats"


def impossible_figures(
    figures: Iterable[tuple[str, float | None, float | None, str]], unit_data: Callable[[str], bool]
) -> list[str]:
    """The figures that no correct model can give, each described in a few words.

    Args:
        figures: (name, value, standard error or None, kind) with kind "elbo" or "log_px" (at
            most 0 on data in [0, 1]) or "kl" (at least 0 on any data); a None value is skipped.
        unit_data: whether the data of a figure's name lie in [0, 1] (asked only for "elbo"
            and "log_px" figures).
    """
    found = []
    for name, value, stderr, kind in figures:
        if value is None:
            continue
        if kind == "kl":
            if beyond(value, 0.0, stderr, above=False):
                found.append(f"{describe(name, value, stderr)} < 0 (a KL divergence is never negative)")
        elif beyond(value, 0.0, stderr, above=True) and unit_data(name):
            found.append(f"{describe(name, value, stderr)} > 0 on data in [0, 1] (where log p(x) <= 0)")
    return found


def run_figures(metrics: dict[str, Any]) -> list[tuple[str, float | None, float | None, str, str]]:
    """train.py's final figures as (name, value, stderr, kind, split)."""
    rows = [("test ELBO", metrics.get("test_elbo"), None, "elbo", "test")]
    surgery = metrics.get("surgery")
    if surgery:
        split = surgery.get("split", "train")
        rows += [
            (f"surgery ELBO ({split})", surgery.get("elbo"), surgery.get("elbo_stderr"), "elbo", split),
            (
                f"surgery marginal KL ({split})",
                surgery.get("marginal_kl"),
                surgery.get("marginal_kl_stderr"),
                "kl",
                split,
            ),
        ]
        ll_split = surgery.get("log_likelihood_split") or "test"
        rows.append(
            (
                f"{ll_split} log p(x)",
                surgery.get("log_likelihood"),
                surgery.get("log_likelihood_stderr"),
                "log_px",
                ll_split,
            )
        )
    return rows


def check_run_results(metrics: dict[str, Any], data: Any) -> None:
    """Raise `ImpossibleResultError` (one line) if train.py's final figures are impossible for its data.

    Args:
        metrics: what `train.train` returns: `test_elbo`, and `surgery` (surgery.json's
            content) when the surgery ran.
        data: the run's data (`split(name)` gives each split's pixels).
    """
    rows = run_figures(metrics)
    split_of = {name: split for name, _, _, _, split in rows}
    found = impossible_figures([row[:4] for row in rows], lambda name: in_unit_interval(data.split(split_of[name])))
    if found:
        where = f", and its files in {metrics['run_dir']} are not results" if metrics.get("run_dir") else ""
        raise ImpossibleResultError(
            f"impossible final figures: {'; '.join(found)}. So the model is wrong{where}; most likely its prior's "
            "log_prob is not normalized: check it with "
            "`python -m pytest tests/priors/test_prior_contract.py --prior MODULE.CLASS`"
        )
