"""Turn a sweep's run directories into a comparison table and plots.

    python -m surgery.report multirun/prior_zoo/2026-11-23/19-16-06 [more run dirs...] [--out report/]

A *run dir* is a folder holding `.hydra/config.yaml` and/or `checkpoints/` (what one
`train.py` job leaves); a *multirun dir* holds numbered job dirs and `multirun.yaml`.
Any folder given is searched for run dirs. Per run this reads the prior's option name,
latent size and seed (`.hydra/config.yaml`, `.hydra/hydra.yaml`'s runtime choices), the
decomposition in `surgery.json` and the epochs trained (`metrics.jsonl`). Runs without a
`surgery.json` are listed as incomplete, with the reason, never dropped; a run with one is
complete without its checkpoints (results committed without them, a checkpoint evaluated
by `python -m surgery output_dir=...`).

Written to the output dir: `report.md` (one row per prior x latent size, each number the
mean ± sample standard deviation over seeds), `decomposition.png` (average KL split into
mutual information and marginal KL, per prior and latent size), `marginal_kl.png`
(marginal KL against latent size, one line per prior, error bars over seeds) and, when
any run left `surgery_aggregate_posterior*.png` pictures (2-D latents), `density_grids.png` with them side
by side, and `samples.png` with one run's decoded prior samples per row, side by side.

The library part is pure functions returning dataclasses; only `main` prints.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from surgery.decomposition import upgrade_dict
from surgery.run import DENSITY_PICTURE, FIT_JSON, SAMPLES_PICTURE, log_px_name
from vae.run_dir import flatten, format_setting, is_target_default, matches_any

#: The table's columns: (surgery.json field, column title).
COLUMNS: tuple[tuple[str, str], ...] = (
    ("elbo", "ELBO"),
    ("avg_kl", "avg KL"),
    ("mutual_info", "MI"),
    ("marginal_kl", "marginal KL"),
    ("total_correlation", "TC"),
    ("dimwise_kl", "dim-wise KL"),
    ("optimal_prior_elbo", "optimal-prior ELBO"),
    ("log_likelihood", "test log p(x)"),
)
#: Every field summarized over seeds (the columns plus what the plots need).
FIELDS: tuple[str, ...] = tuple(k for k, _ in COLUMNS) + ("reconstruction", "log_n")
#: Config keys that never change a result (bookkeeping), left out when runs are grouped.
#: The seed is left out too: runs differing only in it are one row, summarized over seeds.
IGNORED_SETTINGS: tuple[str, ...] = (
    "seed",
    "device",
    "trainer.flush_denormal",  # like the device: how the arithmetic is done, not what is trained
    "logger.",
    "trainer.progress",
    "trainer.resume",
    "trainer.log_every_n_steps",
    "trainer.eval_batch_size",
    "data.path",
    "data.cache_dir",
    "surgery.enabled",
    "surgery.batch_size",
    "surgery.chunk_size",
    "surgery.block_size",
    "surgery.is_batch_elements",
    "surgery.plots",
    "surgery.plot_grid",
    "experiment",
    "hydra.",
)
#: Priors in this order first (the zoo's order), any others after, alphabetically.
PRIOR_ORDER: tuple[str, ...] = ("gaussian", "mixture", "vampprior", "flow", "exemplar", "aggregate")


@dataclass(frozen=True)
class RunRecord:
    """What one run dir holds. `problem` is None for a complete run, else why it is not."""

    path: Path
    prior: str | None
    latent_dim: int | None
    seed: int | None
    epochs: int | None  # complete epochs trained (metrics.jsonl); None without metrics
    surgery: dict[str, Any] | None
    density_pngs: tuple[Path, ...] = ()
    problem: str | None = None
    #: The settings that can change a result (config minus seed and bookkeeping), flat `key=value`.
    settings: frozenset[str] = frozenset()
    log_px: Path | None = None  # per-point test log p(x) (log_px_test.npy), for paired differences
    samples_png: Path | None = None  # samples.png: draws from the prior, decoded
    fit: dict[str, Any] | None = None  # fit.json of a prior fitted after training (python -m priors.fit)


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (ddof=1; None for one value) of `n` values."""

    mean: float | None
    std: float | None
    n: int


@dataclass(frozen=True)
class Row:
    """One prior at one latent size and one setting of everything else, over its complete runs (seeds)."""

    prior: str
    latent_dim: int
    variant: str  # the settings in which this row differs from other rows of the report ("" if none)
    n_runs: int
    seeds: tuple[int | None, ...]
    epochs: tuple[int | None, ...]
    stats: dict[str, Stat]
    splits: tuple[str, ...]
    log_px: tuple[float, ...] | None = None  # per-point test log p(x), averaged over the runs
    data: frozenset[str] = frozenset()  # the `data.*` settings: rows on other data are scored on other points


@dataclass(frozen=True)
class PairedDifference:
    """Test log p(x) of row `a` minus row `b` on the same points: the mean of the per-point
    differences and its standard error (much smaller than either row's own spread, because
    the points' difficulty cancels)."""

    a: str
    b: str
    mean: float
    stderr: float
    n_points: int


@dataclass(frozen=True)
class Report:
    rows: list[Row]
    incomplete: list[RunRecord]
    runs: list[RunRecord]
    paired: list[PairedDifference] = field(default_factory=list)


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    plots: list[Path] = field(default_factory=list)


# ---- reading runs --------------------------------------------------------------------


def is_run_dir(path: Path) -> bool:
    return (path / ".hydra" / "config.yaml").is_file() or (path / "checkpoints").is_dir()


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """The run dirs in or under `paths`, in order, each once.

    In a multirun dir (one holding `multirun.yaml`) every numbered subfolder is a job and
    is returned even when it holds nothing (a job that never started shows up as
    incomplete). Other folders are searched recursively; a run dir is not searched further.
    """
    found: list[Path] = []

    def visit(path: Path) -> None:
        if is_run_dir(path):
            found.append(path)
            return
        children = sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_natural)
        multirun = (path / "multirun.yaml").is_file()
        for child in children:
            if multirun and child.name.isdigit() and not is_run_dir(child):
                found.append(child)
            else:
                visit(child)

    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        if not p.is_dir():
            raise NotADirectoryError(f"{p} is not a directory (give run dirs or a multirun dir)")
        visit(p)
    # Each run once (by its resolved path), named as it was given: a report made from relative
    # paths names its runs relatively, and so stays valid in a clone.
    unique: dict[Path, Path] = {}
    for p in found:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def _natural(path: Path) -> tuple[int, int | str]:
    return (0, int(path.name)) if path.name.isdigit() else (1, path.name)


def _load_yaml(path: Path) -> Any:
    with open(path) as f:
        return yaml.safe_load(f)


def epochs_trained(metrics_path: Path) -> int | None:
    """Complete epochs in `metrics.jsonl` (the highest complete epoch; a resumed run may
    repeat a line), or None when the file is absent."""
    if not metrics_path.is_file():
        return None
    epochs = [0]
    for line in metrics_path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if record.get("complete_epoch", True):
                epochs.append(int(record["epoch"]))
    return max(epochs)


def result_settings(config: dict[str, Any]) -> frozenset[str]:
    """The `key=value` settings of a run that can change its result.

    An argument of a `_target_` at its default is left out, so a run made before the argument
    existed (its config lacks it) groups with a run made since at the default.
    """
    return frozenset(
        format_setting(k, v)
        for k, v in flatten(config).items()
        if not matches_any(k, IGNORED_SETTINGS) and not is_target_default(config, k, v)
    )


def read_run(path: str | Path) -> RunRecord:
    """Read one run dir. Never raises for a broken run: the reason goes to `problem`."""
    path = Path(path)
    problems: list[str] = []
    prior = latent_dim = seed = None
    settings: frozenset[str] = frozenset()
    config_path = path / ".hydra" / "config.yaml"
    if config_path.is_file():
        try:
            config = _load_yaml(config_path) or {}
            choices = {}
            if (path / ".hydra" / "hydra.yaml").is_file():
                hydra_cfg = (_load_yaml(path / ".hydra" / "hydra.yaml") or {}).get("hydra", {})
                choices = (hydra_cfg.get("runtime") or {}).get("choices") or {}
            target = str((config.get("prior") or {}).get("_target_", "?"))
            prior = choices.get("prior") or target.rsplit(".", 1)[-1]
            latent_dim = (config.get("vae") or {}).get("latent_dim")
            seed = config.get("seed")
            settings = result_settings(config)
        except (yaml.YAMLError, AttributeError) as e:
            problems.append(f".hydra/config.yaml unreadable ({e.__class__.__name__})")
    else:
        problems.append("no .hydra/config.yaml")

    epochs = None
    try:
        epochs = epochs_trained(path / "metrics.jsonl")
    except (json.JSONDecodeError, KeyError, ValueError) as e:
        problems.append(f"metrics.jsonl unreadable ({e.__class__.__name__})")

    surgery = None
    surgery_path = path / "surgery.json"
    if surgery_path.is_file():
        try:
            # An older file's `dimwise_kl` of a non-factorized prior is read as its `prior_mismatch_remainder`.
            surgery = upgrade_dict(json.loads(surgery_path.read_text()))
        except json.JSONDecodeError as e:
            problems.append(f"surgery.json unreadable ({e.msg} at line {e.lineno})")
    else:
        problems.append("no surgery.json (surgery not run, or it failed)")
        # Without its surgery.json, a run without checkpoints failed or never started. With it, the
        # run is complete (results committed without their checkpoints, a checkpoint evaluated apart).
        if not (path / "checkpoints").is_dir() or not any((path / "checkpoints").glob("*.pt")):
            problems.append("no checkpoints (the job failed or never started)")

    densities = tuple(sorted(path.glob(f"{DENSITY_PICTURE}*.png")))
    log_px = path / log_px_name("test")
    fit = None
    if (path / FIT_JSON).is_file():
        try:
            fit = json.loads((path / FIT_JSON).read_text())
            # Fits made differently are different rows, never seeds of one (the progress bar changes nothing).
            options = {f"fit.{k}={v}" for k, v in (fit.get("fit_options") or {}).items() if k != "progress"}
            settings = settings | {"fitted after training=true"} | options
        except json.JSONDecodeError as e:
            problems.append(f"{FIT_JSON} unreadable ({e.msg})")
    return RunRecord(
        path=path,
        prior=prior,
        latent_dim=None if latent_dim is None else int(latent_dim),
        seed=None if seed is None else int(seed),
        epochs=epochs,
        surgery=surgery,
        density_pngs=densities,
        problem="; ".join(problems) or None,
        settings=settings,
        log_px=log_px if log_px.is_file() else None,
        samples_png=path / SAMPLES_PICTURE if (path / SAMPLES_PICTURE).is_file() else None,
        fit=fit,
    )


# ---- summarizing ---------------------------------------------------------------------


def stat(values: Sequence[float | None]) -> Stat:
    """Mean and sample std (ddof=1) of the values that are not None/NaN."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return Stat(None, None, 0)
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return Stat(mean, std, len(xs))


def _prior_key(name: str) -> tuple[int, str]:
    return (PRIOR_ORDER.index(name), "") if name in PRIOR_ORDER else (len(PRIOR_ORDER), name)


def _variants(groups: Sequence[frozenset[str]]) -> list[str]:
    """Per group, its settings not shared by every group, minus the prior's and the latent size's.

    A fit option (`fit.*`, how a prior fitted after training was fitted) is only compared among
    the fitted groups: trained runs have none, so one that all fitted groups share says nothing.
    """
    common = set(frozenset.intersection(*groups)) if groups else set()
    fit_values: dict[str, set[str]] = {}
    for x in (x for g in groups for x in g if x.startswith("fit.")):
        fit_values.setdefault(x.split("=", 1)[0], set()).add(x)
    common |= {next(iter(v)) for v in fit_values.values() if len(v) == 1}
    return [
        ", ".join(sorted(_short(x) for x in g - common if not x.startswith(("prior", "vae.latent_dim="))))
        for g in groups
    ]


def _short(setting: str) -> str:
    """`a.b._target_=pkg.mod.Class` as `a.b=Class`: the class names a network; its module is noise."""
    key, _, value = setting.partition("=")
    if key.endswith("._target_"):
        return f"{key.removesuffix('._target_')}={value.rsplit('.', 1)[-1]}"
    return setting


def _mean_log_px(members: Sequence[RunRecord]) -> tuple[float, ...] | None:
    import numpy as np

    arrays = [np.load(r.log_px) for r in members if r.log_px is not None]
    if len(arrays) != len(members) or len({a.shape for a in arrays}) != 1:
        return None
    return tuple(np.mean(arrays, axis=0).tolist())


def paired_differences(rows: Sequence[Row]) -> list[PairedDifference]:
    """For every pair of rows with per-point test log p(x) on the same points (the same data
    settings and as many points), a minus b."""
    out = []
    with_points = [r for r in rows if r.log_px is not None]
    for i, a in enumerate(with_points):
        for b in with_points[i + 1 :]:
            if len(a.log_px) != len(b.log_px) or a.data != b.data:
                continue
            d = [x - y for x, y in zip(a.log_px, b.log_px, strict=False)]
            n = len(d)
            mean = sum(d) / n
            stderr = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else math.nan
            out.append(PairedDifference(row_label(a), row_label(b), mean, stderr, n))
    return out


def row_label(row: Row) -> str:
    return f"{row.prior}, z={row.latent_dim}" + (f" ({row.variant})" if row.variant else "")


def summarize(runs: Sequence[RunRecord]) -> Report:
    """Group complete runs by (prior, latent size, every other setting that changes a result);
    summarize every field over the group's runs (seeds)."""
    complete = [r for r in runs if r.problem is None]
    groups: dict[tuple[str, int, frozenset[str]], list[RunRecord]] = {}
    for r in complete:
        groups.setdefault((str(r.prior), int(r.latent_dim or 0), r.settings), []).append(r)
    keys = sorted(groups, key=lambda k: (_prior_key(k[0]), k[1], sorted(k[2])))
    variants = dict(zip(keys, _variants([k[2] for k in keys]), strict=False))
    rows = []
    for key in keys:
        prior, latent_dim, settings = key
        members = sorted(groups[key], key=lambda r: (r.seed is None, r.seed))
        rows.append(
            Row(
                prior=prior,
                latent_dim=latent_dim,
                variant=variants[key],
                n_runs=len(members),
                seeds=tuple(r.seed for r in members),
                epochs=tuple(r.epochs for r in members),
                stats={k: stat([(r.surgery or {}).get(k) for r in members]) for k in FIELDS},
                splits=tuple(sorted({str((r.surgery or {}).get("split", "?")) for r in members})),
                log_px=_mean_log_px(members),
                data=frozenset(x for x in settings if x.startswith("data.")),
            )
        )
    return Report(
        rows=rows,
        incomplete=[r for r in runs if r.problem is not None],
        runs=list(runs),
        paired=paired_differences(rows),
    )


def build_report(paths: Iterable[str | Path]) -> Report:
    return summarize([read_run(p) for p in find_run_dirs(paths)])


# ---- rendering -----------------------------------------------------------------------


def format_stat(s: Stat, digits: int = 2) -> str:
    if s.mean is None:
        return "—"
    if s.std is None:
        return f"{s.mean:.{digits}f}"
    return f"{s.mean:.{digits}f} ± {s.std:.{digits}f}"


def _format_epochs(epochs: Sequence[int | None]) -> str:
    known = [e for e in epochs if e is not None]
    if not known:
        return "—"  # no metrics.jsonl: a fitted prior's or an evaluated checkpoint's directory
    lo, hi = min(known), max(known)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def render_markdown(report: Report, plots: Sequence[Path] = ()) -> str:
    lines = [
        "# ELBO surgery report",
        "",
        "In nats per data point; each cell is the mean ± sample standard deviation (ddof=1) over the "
        "runs (seeds) of that prior and latent size; a single run shows its value. ELBO, average KL, "
        "MI, marginal KL, TC, dimension-wise KL and optimal-prior ELBO are on the surgery split; "
        "test log p(x) is the importance-sampled log-likelihood. — : not reported (e.g. the "
        "dimension-wise KL of a non-factorized prior).",
        "",
    ]
    header = ["prior", "latents", "variant", *(title for _, title in COLUMNS), "runs", "epochs", "split"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in report.rows:
        cells = [
            row.prior,
            str(row.latent_dim),
            row.variant or "—",
            *(format_stat(row.stats[k]) for k, _ in COLUMNS),
            str(row.n_runs),
            _format_epochs(row.epochs),
            ",".join(row.splits),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if not report.rows:
        lines.append("")
        lines.append("No complete runs.")
    lines += ["", f"Complete runs: {sum(r.n_runs for r in report.rows)}; incomplete: {len(report.incomplete)}.", ""]
    fitted = [r for r in report.runs if r.problem is None and r.fit is not None]
    if fitted:
        lines += [
            "## Fitted after training",
            "",
            "Priors fitted to a trained model's frozen encoder and decoder (`python -m priors.fit`). With the "
            "networks fixed, the ELBO changes by exactly the marginal-KL reduction; the last columns check that "
            "(gain − reduction, ± its standard error). The training split is where the prior was fitted, so its "
            "share is optimistic; the test split and test log p(x) are the honest measures. The exact aggregate "
            "posterior is the ceiling: it closes 100% of the training split's marginal KL.",
            "",
            "| fitted prior | to a model with | marginal KL, train (before → after) | closed, train | "
            "marginal KL, test (before → after) | closed, test | ELBO gain, train | gain − reduction | "
            "test log p(x) change | fit epochs, seconds |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in fitted:
            f, tr, te = r.fit, r.fit["train"], r.fit["test"]
            ll = f.get("test_log_likelihood_gain")
            how = "—" if not f.get("fit") else f"{f['fit']['epochs']}, {f['fit']['seconds']:.0f}"
            fresh = " (fresh binarizations)" if (f.get("fit_options") or {}).get("rebinarize") else ""
            lines.append(
                f"| {f['new_prior']}{fresh} | {f['old_prior']} | {tr['marginal_kl_before']:.3f} → "
                f"{tr['marginal_kl_after']:.3f} | "
                f"{100 * tr['share_closed']:.1f}% | {te['marginal_kl_before']:.3f} → {te['marginal_kl_after']:.3f} | "
                f"{100 * te['share_closed']:.1f}% | {tr['elbo_gain']:+.3f} | "
                f"{tr['identity_gap']:+.3f} ± {tr['identity_gap_stderr']:.3f} | "
                f"{'—' if ll is None else f'{ll:+.3f}'} | {how} |"
            )
        lines.append("")
    if report.paired:
        lines += [
            "## Paired differences in test log p(x)",
            "",
            "Row a minus row b on the same test points: the mean of the per-point differences ± its "
            "standard error. The per-row spread above includes how hard each test point is; a paired "
            "difference cancels it, so this is the uncertainty of a ranking. Rows whose data settings "
            "differ are scored on other points and are not paired.",
            "",
            "| a | b | a − b (nats) | points |",
            "|---|---|---|---|",
        ]
        lines += [f"| {p.a} | {p.b} | {p.mean:+.3f} ± {p.stderr:.3f} | {p.n_points:,} |" for p in report.paired]
        lines.append("")
    lines += ["## Incomplete runs", ""]
    if report.incomplete:
        lines.append("| run dir | prior | latents | seed | epochs | reason |")
        lines.append("|---|---|---|---|---|---|")
        for r in report.incomplete:
            lines.append(
                f"| {r.path} | {r.prior or '?'} | {r.latent_dim if r.latent_dim is not None else '?'} | "
                f"{r.seed if r.seed is not None else '?'} | {r.epochs if r.epochs is not None else '?'} | {r.problem} |"
            )
    else:
        lines.append("None.")
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.stem}]({p.name})" for p in plots]
    lines += [
        "",
        "## Runs",
        "",
        "| run dir | prior | latents | seed | epochs | best val ELBO (epoch) | "
        "slope, last 50 epochs (nats/epoch) | hours |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report.runs:
        curve = learning_curve(r.path / "metrics.jsonl")
        if curve:
            best_epoch, best, _ = max(curve, key=lambda c: c[1])
            slope = recent_slope(curve)
            hours = sum(s for _, _, s in curve if math.isfinite(s)) / 3600
            lines.append(
                f"| {r.path} | {r.prior} | {r.latent_dim} | {r.seed} | {curve[-1][0]} | {best:.2f} ({best_epoch}) | "
                f"{'—' if slope is None else f'{slope:+.4f}'} | {hours:.2f} |"
            )
        else:
            lines.append(f"| {r.path} | {r.prior} | {r.latent_dim} | {r.seed} | — | — | — | — |")
    return "\n".join(lines) + "\n"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in workers

    return Figure(figsize=(width, height), layout="constrained")


def plot_average_kl_split(report: Report, path: Path) -> Path:
    """Average KL split into mutual information (bottom) and marginal KL (top), one bar per
    prior and latent size, error bars over seeds; reconstruction is off scale, so left out."""
    fig = _figure(max(6.0, 0.6 * len(report.rows) + 2), 4.5)
    ax = fig.add_subplot()
    labels = [f"{r.prior}\nz={r.latent_dim}" + (f"\n{r.variant}" if r.variant else "") for r in report.rows]
    x = list(range(len(report.rows)))
    mi = [r.stats["mutual_info"].mean or 0.0 for r in report.rows]
    mkl = [r.stats["marginal_kl"].mean or 0.0 for r in report.rows]
    mi_err = [r.stats["mutual_info"].std or 0.0 for r in report.rows]
    mkl_err = [r.stats["marginal_kl"].std or 0.0 for r in report.rows]
    ax.bar(x, mi, yerr=mi_err, label="mutual information I[n; z]", color="tab:blue", capsize=3)
    ax.bar(x, mkl, bottom=mi, yerr=mkl_err, label="marginal KL(q(z) || p(z))", color="tab:orange", capsize=3)
    log_n = [r.stats["log_n"].mean for r in report.rows if r.stats["log_n"].mean is not None]
    if log_n:
        ax.axhline(max(log_n), color="grey", linestyle="--", linewidth=1, label=f"log N = {max(log_n):.2f}")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("nats per data point")
    ax.set_title("Average KL = mutual information + marginal KL")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def plot_marginal_kl(report: Report, path: Path) -> Path:
    """Marginal KL against latent size, one line per prior, error bars over seeds."""
    fig = _figure(6.0, 4.5)
    ax = fig.add_subplot()
    priors = sorted({r.prior for r in report.rows}, key=_prior_key)
    for prior in priors:
        rows = [r for r in report.rows if r.prior == prior and r.stats["marginal_kl"].mean is not None]
        if rows:
            ax.errorbar(
                [r.latent_dim for r in rows],
                [r.stats["marginal_kl"].mean for r in rows],
                yerr=[r.stats["marginal_kl"].std or 0.0 for r in rows],
                marker="o",
                capsize=3,
                label=prior,
            )
    ax.set_xlabel("latent dimensions")
    ax.set_ylabel("marginal KL (nats per data point)")
    ax.set_title("What a better prior can win back")
    if priors:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def plot_density_grids(runs: Sequence[RunRecord], path: Path, columns: int = 4) -> Path | None:
    """Every run's `surgery_aggregate_posterior*.png` in one figure, titled by prior, latent size and seed;
    None when no run has one."""
    import matplotlib.image as mpimg

    panels = [
        (r, p)
        for r in sorted(runs, key=lambda r: (_prior_key(str(r.prior)), r.latent_dim or 0, r.seed or 0))
        for p in r.density_pngs
    ]
    if not panels:
        return None
    cols = min(columns, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(4.0 * cols, 3.2 * rows)
    for i, (run, png) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(mpimg.imread(png))
        ax.set_title(f"{run.prior}, z={run.latent_dim}, seed {run.seed}\n{png.name}", fontsize=8)
        ax.axis("off")
    fig.savefig(path, dpi=120)
    return path


def plot_samples_side_by_side(report: Report, path: Path) -> Path | None:
    """One picture of samples per row of the table (its first run that has `samples.png`), side by side;
    None when no run has one."""
    import matplotlib.image as mpimg

    panels = []
    for row in report.rows:
        for run in report.runs:
            if (
                run.problem is None
                and run.samples_png is not None
                and run.prior == row.prior
                and run.latent_dim == row.latent_dim
                and row.seeds[:1] == (run.seed,)
            ):
                panels.append((row, run.samples_png))
                break
    if not panels:
        return None
    fig = _figure(3.2 * len(panels), 3.6)
    for i, (row, png) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(mpimg.imread(png))
        ax.set_title(row_label(row), fontsize=8)
        ax.axis("off")
    fig.savefig(path, dpi=120)
    return path


def learning_curve(metrics_path: Path) -> list[tuple[int, float, float]]:
    """(epoch, validation ELBO, seconds) of every complete epoch in metrics.jsonl, in order."""
    if not metrics_path.is_file():
        return []
    curve: dict[int, tuple[float, float]] = {}
    for line in metrics_path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if record.get("complete_epoch", True) and record.get("val_elbo") is not None:
                curve[int(record["epoch"])] = (float(record["val_elbo"]), float(record.get("seconds", math.nan)))
    return [(e, v, s) for e, (v, s) in sorted(curve.items())]


def recent_slope(curve: Sequence[tuple[int, float, float]], window: int = 50) -> float | None:
    """Least-squares slope of the validation ELBO over the last `window` epochs (nats per epoch)."""
    tail = curve[-window:]
    if len(tail) < 2:
        return None
    xs, ys = [e for e, _, _ in tail], [v for _, v, _ in tail]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else None


def plot_learning_curves(runs: Sequence[RunRecord], path: Path) -> Path | None:
    """Validation ELBO against epoch for every run with metrics, finished or still going; None if none."""
    curves = [(r, learning_curve(r.path / "metrics.jsonl")) for r in runs]
    curves = [(r, c) for r, c in curves if c]
    if not curves:
        return None
    import matplotlib

    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot()
    # past ten curves twenty colours; past twenty the colours come round again, dashed
    colours = matplotlib.colormaps["tab10" if len(curves) <= 10 else "tab20"]
    for i, (run, curve) in enumerate(curves):
        label = f"{run.prior}, z={run.latent_dim}, {run.path.name}" + ("" if run.problem is None else " (unfinished)")
        style = "-" if (i // colours.N) % 2 == 0 else "--"
        ax.plot(
            [e for e, _, _ in curve],
            [v for _, v, _ in curve],
            style,
            color=colours(i % colours.N),
            label=label,
            linewidth=1,
        )
    best = max(v for _, c in curves for _, v, _ in c)
    ax.set_ylim(best - 25, best + 2)  # the first epochs are far below: keep the converging part readable
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation ELBO (nats)")
    ax.set_title("Learning curves")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    return path


def write_report(report: Report, out: str | Path) -> ReportFiles:
    """Write `report.md` and the PNGs to `out` (created); return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    if report.rows:  # no complete run: no bars to draw (the learning curves may still be)
        plots += [
            plot_average_kl_split(report, out / "decomposition.png"),
            plot_marginal_kl(report, out / "marginal_kl.png"),
        ]
    for extra in (
        plot_density_grids(report.runs, out / "density_grids.png"),
        plot_samples_side_by_side(report, out / "samples.png"),
        plot_learning_curves(report.runs, out / "learning_curves.png"),
    ):
        if extra is not None:
            plots.append(extra)
    markdown = out / "report.md"
    markdown.write_text(render_markdown(report, plots))
    return ReportFiles(markdown=markdown, plots=plots)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m surgery.report",
        description="Table and plots comparing the ELBO decomposition of trained runs.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run dirs, multirun dirs, or folders holding them")
    parser.add_argument("--out", default="report", help="output dir (default: report/)")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.paths)
    except (FileNotFoundError, NotADirectoryError) as e:
        print(f"surgery.report: error: {e}", file=sys.stderr)
        return 2
    if not report.runs:
        print(
            f"surgery.report: error: no run dirs found under {', '.join(args.paths)} "
            "(a run dir holds .hydra/config.yaml or checkpoints/)",
            file=sys.stderr,
        )
        return 2
    files = write_report(report, args.out)
    n_complete = sum(r.n_runs for r in report.rows)
    print(f"{len(report.runs)} runs: {n_complete} complete, {len(report.incomplete)} incomplete")
    for r in report.incomplete:
        print(f"  incomplete: {r.path}: {r.problem}")
    print(f"table: {files.markdown}")
    for p in files.plots:
        print(f"plot:  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
