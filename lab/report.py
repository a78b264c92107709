"""Turn run directories into a comparison table across seeds, paired differences and plots.

    python -m surgery.report results/literature/runs --out results/literature \
        [--headline results/literature/headline.yaml]

A *run dir* is a folder holding `.hydra/config.yaml` and/or `checkpoints/` (what one
`train.py` job leaves); a *multirun dir* holds numbered job dirs and `multirun.yaml`.
Any folder given is searched for run dirs. Per run this reads the prior's option name,
latent size and seed (`.hydra/config.yaml`, `.hydra/hydra.yaml`'s runtime choices), the
decomposition in `surgery.json`, the per-point test log p(x) in `log_px_test.npy` and the
epochs trained (`metrics.jsonl`). Runs without a `surgery.json` are listed as incomplete,
with the reason, never dropped; a run with one is complete without its checkpoints (results
committed without them, a checkpoint evaluated by `python -m surgery output_dir=...`).

Runs whose configs differ only in the seed, in what a resume may change
(`lab.run_dir.RESUMABLE_CHANGES`: how long and how verbosely to train, the evaluation's
options) and in bookkeeping are seeds of one *row*; how each was evaluated is read from
its `surgery.json` instead (split, importance samples, points), so runs evaluated
differently are different rows. Two runs of one seed in a row are refused: nothing in their
configs tells them apart, and the row would count them as two seeds.

Written to the output dir: `report.md` with

- one row per prior and setting: every estimate of `surgery.text.TERMS` as the mean ±
  sample standard deviation (ddof=1) over the row's seeds, and how many seeds;
- every seed's own values;
- paired differences in test log p(x): for two rows scored on the same test points, per seed
  s the mean of the per-point differences (row's seed s minus the baseline's seed s) with its
  standard error over the points, and the mean ± standard deviation of those per-seed
  differences over the seeds both rows have. A seed only one row has is left out of the pair
  and named; first for the priors of one setting, then for the other pairs on the same points;

and the plots `decomposition.png` (average KL split into mutual information and marginal
KL), `marginal_kl.png` (marginal KL against latent size, error bars over seeds),
`learning_curves.png`, and when runs left them `density_grids.png` and `samples.png`.
With `--headline SPEC.yaml`, also `headline.md`: a short table (prior, seeds, test log p(x)
mean ± sd over seeds, the published figure) of the rows the spec selects, with the command
that regenerates it in its first line, for a README to include verbatim (`HeadlineSpec`),
and `headline.png`, the same rows with every seed's value drawn beside the published one.

The library part is pure functions returning dataclasses; only `main` prints.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import yaml

from lab.pictures import SAMPLES_PICTURE
from lab.run_dir import (
    LOG_FILE,
    RESUMABLE_CHANGES,
    flatten,
    format_setting,
    is_target_default,
    matches_any,
    read_code,
    stop_reason,
)
from lab.surgery import DENSITY_PICTURE, FIT_JSON, log_px_name
from surgery.decomposition import upgrade_dict
from surgery.plots import new_figure
from surgery.text import TERMS
from vae.model import NETWORKS
from vae.validation import ConfigError

#: The table's columns: (surgery.json field, column title), in `surgery.text.TERMS`' order.
COLUMNS: tuple[tuple[str, str], ...] = tuple((t.name, t.title) for t in TERMS if t.in_report)
#: Every field summarized over seeds (the columns plus what the plots need).
FIELDS: tuple[str, ...] = tuple(k for k, _ in COLUMNS) + ("log_n",)
#: Config keys that do not tell one row from another: what a resume may change (how long and how
#: verbosely to train, the evaluation's options: each run's own evaluation is read from its
#: surgery.json, `EVALUATION_KEYS`), how the run was started, and the seed, over which a row
#: is summarized.
IGNORED_SETTINGS: tuple[str, ...] = ("seed", "trainer.resume", "experiment", "hydra.", *RESUMABLE_CHANGES)
#: The setting that marks a fitted prior's run (`python -m priors.fit`): such rows are never seeds of trained ones.
FITTED = "fitted after training=true"
#: surgery.json keys that say how a run was evaluated: runs evaluated differently are different rows.
EVALUATION_KEYS: tuple[str, ...] = ("split", "log_likelihood_split", "is_samples", "is_points")
#: Priors in this order first (the zoo's order), any others after, alphabetically.
PRIOR_ORDER: tuple[str, ...] = ("gaussian", "mixture", "vampprior", "flow", "exemplar", "aggregate")
#: Where the prior options live: a run without `.hydra/hydra.yaml` is named by the option of its class.
PRIOR_CONFIGS = Path(__file__).resolve().parents[1] / "conf" / "prior"


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
    #: The run's resolved config (.hydra/config.yaml): what a headline selects rows by.
    config: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    #: Which code trained it (code.jsonl): each distinct commit and sources digest, oldest first,
    #: as `code_label` writes them; () for a run made before code.jsonl was kept.
    code: tuple[str, ...] = ()
    #: The sources digests of code.jsonl: runs of one row whose sets differ were made by different code.
    sources: frozenset[str] = frozenset()


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
    data: frozenset[str] = frozenset()  # the `data.*` settings: rows on other data are scored on other points
    #: Everything but the prior: rows with the same setting and latent size compare priors.
    setting: frozenset[str] = frozenset()
    runs: tuple[RunRecord, ...] = field(default=(), compare=False, repr=False)  # in seed order

    @property
    def log_px(self) -> tuple[Path, ...] | None:
        """The runs' per-point test log p(x) files (log_px_test.npy), None unless every run has one."""
        paths = tuple(r.log_px for r in self.runs if r.log_px is not None)
        return paths if self.runs and len(paths) == len(self.runs) else None


@dataclass(frozen=True)
class SeedDifference:
    """Test log p(x) of a row's run minus the baseline's run of the same seed, on the same points:
    the mean of the per-point differences and its standard error over the points."""

    seed: int | None
    mean: float
    stderr: float
    n_points: int


@dataclass(frozen=True)
class PairedDifference:
    """Row minus baseline in test log p(x), paired seed by seed on the same test points.

    `over_seeds` is the mean ± standard deviation of the per-seed means over the paired seeds:
    how much the difference moves from one training run to the next. Each per-seed standard
    error is far smaller than either row's spread over the points, because how hard each point
    is cancels. `unpaired` names the seeds left out, and why (one row lacks the seed, a run has
    no per-point values, or its points are other points).
    """

    row: str
    baseline: str
    same_setting: bool  # the same setting and latent size: the two rows differ in their priors only
    seeds: tuple[SeedDifference, ...]
    over_seeds: Stat
    unpaired: tuple[str, ...] = ()
    setting: str = ""  # the shared setting's label, for `same_setting` pairs


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
    headline: Path | None = None


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


@functools.cache
def _prior_options(folder: Path = PRIOR_CONFIGS) -> dict[str, str]:
    """`{class path: option name}` of the prior options that name their class themselves (an option
    that extends another, like flow_spline, names none); a class two options name is left out."""
    found: dict[str, list[str]] = {}
    for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        content = _load_yaml(path) or {}
        if isinstance(content, dict) and "_target_" in content and "defaults" not in content:
            found.setdefault(str(content["_target_"]), []).append(path.stem)
    return {target: names[0] for target, names in found.items() if len(names) == 1}


def prior_name(target: str, choice: str | None) -> str:
    """The prior's option name: the run's own choice (`.hydra/hydra.yaml`), else the option whose
    class it is, else the class name. Runs made with and without hydra.yaml so share one name."""
    return choice or _prior_options().get(target) or target.rsplit(".", 1)[-1]


def read_run(path: str | Path) -> RunRecord:
    """Read one run dir. Never raises for a broken run: the reason goes to `problem`."""
    path = Path(path)
    problems: list[str] = []
    prior = latent_dim = seed = None
    settings: frozenset[str] = frozenset()
    raw: dict[str, Any] = {}
    config_path = path / ".hydra" / "config.yaml"
    if config_path.is_file():
        try:
            config = _load_yaml(config_path) or {}
            choices = {}
            if (path / ".hydra" / "hydra.yaml").is_file():
                hydra_cfg = (_load_yaml(path / ".hydra" / "hydra.yaml") or {}).get("hydra", {})
                choices = (hydra_cfg.get("runtime") or {}).get("choices") or {}
            prior = prior_name(str((config.get("prior") or {}).get("_target_", "?")), choices.get("prior"))
            latent_dim = (config.get("vae") or {}).get("latent_dim")
            seed = config.get("seed")
            settings = result_settings(config)
            raw = config
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
            settings = settings | {
                format_setting(f"evaluation.{k}", surgery[k]) for k in EVALUATION_KEYS if surgery.get(k) is not None
            }
        except json.JSONDecodeError as e:
            problems.append(f"surgery.json unreadable ({e.msg} at line {e.lineno})")
    else:
        problems.append("no surgery.json (surgery not run, or it failed)")
        # Without its surgery.json, a run without checkpoints failed or never started. With it, the
        # run is complete (results committed without their checkpoints, a checkpoint evaluated apart).
        if not (path / "checkpoints").is_dir() or not any((path / "checkpoints").glob("*.pt")):
            problems.append("no checkpoints (the job failed or never started)")
        if (stopped := stop_reason(path / LOG_FILE)) is not None:
            problems.append(f"stopped by {stopped}")

    densities = tuple(sorted(path.glob(f"{DENSITY_PICTURE}*.png")))
    log_px = path / log_px_name("test")
    fit = None
    if (path / FIT_JSON).is_file():
        try:
            fit = json.loads((path / FIT_JSON).read_text())
            # Fits made differently are different rows, never seeds of one (the progress bar changes nothing).
            options = {f"fit.{k}={v}" for k, v in (fit.get("fit_options") or {}).items() if k != "progress"}
            settings = settings | {FITTED} | options
        except json.JSONDecodeError as e:
            problems.append(f"{FIT_JSON} unreadable ({e.msg})")
    code: tuple[str, ...] = ()
    sources: frozenset[str] = frozenset()
    try:
        lines = read_code(path) or []
        code = tuple(dict.fromkeys(code_label(line) for line in lines))
        sources = frozenset(line["sources_sha256"] for line in lines)
    except (OSError, UnicodeDecodeError, ValueError):
        code = ("code.jsonl unreadable",)  # a record of the run, not a result: the run stays complete
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
        config=raw,
        code=code,
        sources=sources,
    )


def code_label(line: Mapping[str, Any]) -> str:
    """One line of code.jsonl, short: the commit's first 7 hex digits (`no checkout` outside git)
    and the sources digest's first 8, which tells an uncommitted edit from its commit."""
    commit = line.get("commit")
    return f"{commit[:7] if isinstance(commit, str) else 'no checkout'} (sources {line['sources_sha256'][:8]})"


def made_by_different_code(row: Row) -> bool:
    """Whether the row's runs that recorded their code (code.jsonl) did not all record the same
    sources: a fix landed between its seeds, or one seed was resumed with other code."""
    return len({r.sources for r in row.runs if r.sources}) > 1


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


def _is_prior_setting(setting: str) -> bool:
    return setting.startswith("prior.") or setting.startswith("prior=")


def _variants(groups: Sequence[frozenset[str]], priors: Sequence[str] | None = None) -> list[str]:
    """Per group, its settings not shared by every group, minus the latent size.

    A fit option (`fit.*`, how a prior fitted after training was fitted) is only compared among
    the fitted groups: trained runs have none, so one that all fitted groups share says nothing.
    A fitted group without the option (a fit.json written before it existed) counts as another
    value, so the option is shown where it is set.
    Likewise a prior's own option (`prior.*`) is only compared among the groups of the same prior
    (`priors`, one name per group; without it, prior options are left out): the name says the rest.
    """
    common = set(frozenset.intersection(*groups)) if groups else set()
    fitted = [g for g in groups if FITTED in g]
    fit_keys = {x.split("=", 1)[0] for g in fitted for x in g if x.startswith("fit.")}
    for key in fit_keys:
        values = {next((x for x in g if x.split("=", 1)[0] == key), None) for g in fitted}
        if len(values) == 1 and None not in values:
            common |= values
    shown = []
    for i, g in enumerate(groups):
        if priors is None:
            own = {x for x in g if _is_prior_setting(x)}
        else:
            same = [h for h, p in zip(groups, priors, strict=True) if p == priors[i]]
            own = {x for x in frozenset.intersection(*same) if _is_prior_setting(x)}
        rest = g - common - own - {x for x in g if x.startswith("vae.latent_dim=")}
        shown.append(", ".join(sorted(_short(x) for x in rest)))
    return shown


def _short(setting: str) -> str:
    """`a.b._target_=pkg.mod.Class` as `a.b=Class`: the class names a network; its module is noise."""
    key, _, value = setting.partition("=")
    if key.endswith("._target_"):
        return f"{key.removesuffix('._target_')}={value.rsplit('.', 1)[-1]}"
    return setting


def row_label(row: Row) -> str:
    return f"{row.prior}, z={row.latent_dim}" + (f" ({row.variant})" if row.variant else "")


def summarize(runs: Sequence[RunRecord]) -> Report:
    """Group complete runs by (prior, latent size, every other setting that changes a result);
    summarize every field over the group's runs (seeds); pair the rows scored on the same points."""
    complete = [r for r in runs if r.problem is None]
    groups: dict[tuple[str, int, frozenset[str]], list[RunRecord]] = {}
    for r in complete:
        groups.setdefault((str(r.prior), int(r.latent_dim or 0), r.settings), []).append(r)
    check_one_run_per_seed(groups)
    keys = sorted(groups, key=lambda k: (_prior_key(k[0]), k[1], sorted(k[2])))
    variants = dict(zip(keys, _variants([k[2] for k in keys], [k[0] for k in keys]), strict=True))
    rows = []
    for key in keys:
        prior, latent_dim, settings = key
        members = sorted(groups[key], key=lambda r: (r.seed is None, r.seed or 0, str(r.path)))
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
                data=frozenset(x for x in settings if x.startswith("data.")),
                setting=frozenset(x for x in settings if not _is_prior_setting(x)),
                runs=tuple(members),
            )
        )
    return Report(
        rows=rows,
        incomplete=[r for r in runs if r.problem is not None],
        runs=list(runs),
        paired=paired_differences(rows),
    )


def check_one_run_per_seed(groups: Mapping[tuple[str, int, frozenset[str]], Sequence[RunRecord]]) -> None:
    """Refuse a row that would hold two runs of one seed: its mean and sd would count one training
    run's seed twice, or mix two trainings that nothing in their configs tells apart (another
    version of the code, a checkpoint evaluated again at another epoch). A `ConfigError` names them."""
    repeated = []
    for (prior, latent_dim, _), members in groups.items():
        by_seed: dict[int | None, list[str]] = {}
        for r in members:
            by_seed.setdefault(r.seed, []).append(str(r.path))
        repeated += [
            f"{prior}, z={latent_dim}, seed {_format_seeds([seed])}: {', '.join(sorted(paths))}"
            for seed, paths in by_seed.items()
            if len(paths) > 1
        ]
    if repeated:
        raise ConfigError(
            "a row's runs are its seeds, but these runs share the prior, latent size, seed and every setting "
            f"that changes a result: {'; '.join(sorted(repeated))}. Report them from separate folders"
        )


def build_report(paths: Iterable[str | Path]) -> Report:
    return summarize([read_run(p) for p in find_run_dirs(paths)])


# ---- paired differences --------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _load_log_px(path: Path) -> np.ndarray:
    return np.load(path).astype(np.float64)


def paired_seed(row_run: RunRecord, baseline_run: RunRecord) -> SeedDifference | str:
    """Row's run minus the baseline's on the same test points, or why they cannot be paired."""
    if row_run.log_px is None or baseline_run.log_px is None:
        return "no per-point log p(x) (log_px_test.npy)"
    a, b = _load_log_px(row_run.log_px), _load_log_px(baseline_run.log_px)
    if a.shape != b.shape:
        return f"other test points ({a.size:,} and {b.size:,})"
    d = a - b
    n = d.size
    stderr = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return SeedDifference(row_run.seed, float(d.mean()), stderr, n)


def pair_rows(row: Row, baseline: Row, *, row_name: str, baseline_name: str) -> PairedDifference | None:
    """`row` minus `baseline`, seed s with seed s; None when no seed pairs (no per-point values,
    or other points). Seeds only one of them has are named in `unpaired`, never paired with another."""
    mine = {r.seed: r for r in row.runs}  # one run per seed (`check_one_run_per_seed`)
    theirs = {r.seed: r for r in baseline.runs}
    seeds: list[SeedDifference] = []
    unpaired: dict[str, list[int | None]] = {}  # why -> the seeds left out for that reason
    for seed in sorted(mine.keys() | theirs.keys(), key=lambda s: (s is None, s or 0)):
        if seed not in theirs:
            unpaired.setdefault(f"only {row_name}", []).append(seed)
        elif seed not in mine:
            unpaired.setdefault(f"only {baseline_name}", []).append(seed)
        else:
            paired = paired_seed(mine[seed], theirs[seed])
            if isinstance(paired, str):
                unpaired.setdefault(paired, []).append(seed)
            else:
                seeds.append(paired)
    if not seeds:
        return None
    return PairedDifference(
        row=row_name,
        baseline=baseline_name,
        same_setting=row.setting == baseline.setting and row.latent_dim == baseline.latent_dim,
        seeds=tuple(seeds),
        over_seeds=stat([s.mean for s in seeds]),
        unpaired=tuple(f"seed{'s' if len(v) > 1 else ''} {_format_seeds(v)}: {why}" for why, v in unpaired.items()),
    )


def paired_differences(rows: Sequence[Row]) -> list[PairedDifference]:
    """Every pair of rows on the same data, the later row minus the earlier one (the richer prior
    minus the baseline, in `PRIOR_ORDER`), that pairs at least one seed on the same points.

    Pairs of one setting (rows that differ in their priors only) come first, setting by setting,
    labelled by the priors alone and carrying the setting's label; then all other pairs, labelled
    in full."""
    settings = sorted({(r.latent_dim, r.setting) for r in rows}, key=lambda s: (s[0], sorted(s[1])))
    labels = _variants([s for _, s in settings])  # how the settings differ from each other
    same: dict[tuple[int, frozenset[str]], list[PairedDifference]] = {s: [] for s in settings}
    other = []
    for j, row in enumerate(rows):
        for baseline in rows[:j]:
            if row.data != baseline.data:
                continue  # other grey levels or another data set: other binary points
            key = (row.latent_dim, row.setting)
            if key == (baseline.latent_dim, baseline.setting):
                pair = pair_rows(
                    row, baseline, row_name=_prior_label(row, rows), baseline_name=_prior_label(baseline, rows)
                )
                if pair is not None:
                    label = labels[settings.index(key)]
                    same[key].append(replace(pair, setting=f"z={row.latent_dim}" + (f", {label}" if label else "")))
            else:
                pair = pair_rows(row, baseline, row_name=row_label(row), baseline_name=row_label(baseline))
                if pair is not None:
                    other.append(pair)
    return [p for s in settings for p in same[s]] + other


def _prior_label(row: Row, rows: Sequence[Row]) -> str:
    """The row's prior, with its own options where another row of its setting has the same prior."""
    twins = [r for r in rows if r.prior == row.prior and r.setting == row.setting and r.latent_dim == row.latent_dim]
    if len(twins) < 2:
        return row.prior
    own = sorted(_short(x) for x in row.runs[0].settings if _is_prior_setting(x))
    common = set.intersection(*({_short(x) for x in t.runs[0].settings if _is_prior_setting(x)} for t in twins))
    return f"{row.prior} ({', '.join(x for x in own if x not in common)})"


# ---- headline ------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadlineSpec:
    """What `headline.md` shows, read from a YAML file (`--headline`):

        where: {vae.latent_dim: 40, data.byte_divisor: 255}   # config values every run of a row has
        priors:                                               # by option name; both keys optional
          gaussian: {name: Gaussian, published: [-84.45, 0.12]}
        levels:                                               # figures of no row, drawn as lines
          "two-layer HVAE, Exemplar prior (published)": -81.22
        source: Published: ...                                # said under the table
        note: ...

    `where` is required; a key absent from an older config matches its class's default.
    Rows of priors fitted after training are left out: the headline is of priors trained with
    their model.
    """

    where: dict[str, Any]
    names: dict[str, str] = field(default_factory=dict)
    published: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    levels: dict[str, float] = field(default_factory=dict)
    source: str = ""
    note: str = ""


def _finite_number(value: Any) -> bool:
    """A YAML number that can stand in the table: finite, and not a `true`/`false` (a bool is an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_headline_spec(path: str | Path) -> HeadlineSpec:
    """Read and check a headline spec; a mistake is a one-line `ConfigError` naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--headline {path}: no such file")
    try:
        content = _load_yaml(path) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--headline {path}: not YAML ({e.__class__.__name__})") from None
    if not isinstance(content, dict):
        raise ConfigError(f"--headline {path}: expected a mapping with `where`, got {type(content).__name__}")
    unknown = sorted(set(content) - {"where", "priors", "levels", "source", "note"})
    if unknown:
        raise ConfigError(
            f"--headline {path}: unknown key(s) {', '.join(unknown)} (where, priors, levels, source, note)"
        )
    where = content.get("where")
    if not isinstance(where, dict) or not where:
        raise ConfigError(f"--headline {path}: `where` must map config keys to values, e.g. vae.latent_dim: 40")
    names, published = {}, {}
    for prior, entry in (content.get("priors") or {}).items():
        if not isinstance(entry, dict) or set(entry) - {"name", "published"}:
            raise ConfigError(f"--headline {path}: priors.{prior} takes `name` and `published` only")
        if "name" in entry:
            names[str(prior)] = str(entry["name"])
        if "published" in entry:
            value = entry["published"]
            pair = value if isinstance(value, list) else [value]
            if not 1 <= len(pair) <= 2 or not all(_finite_number(v) for v in pair) or (len(pair) == 2 and pair[1] < 0):
                raise ConfigError(
                    f"--headline {path}: priors.{prior}.published must be a number or [mean, sd] with sd >= 0"
                )
            published[str(prior)] = (float(pair[0]), float(pair[1]) if len(pair) == 2 else None)
    levels = content.get("levels") or {}
    if not isinstance(levels, dict) or not all(_finite_number(v) for v in levels.values()):
        raise ConfigError(f"--headline {path}: `levels` must map a label to a number, e.g. 'two-layer': -81.22")
    return HeadlineSpec(
        where={str(k): v for k, v in where.items()},
        names=names,
        published=published,
        levels={str(k): float(v) for k, v in levels.items()},
        source=str(content.get("source") or ""),
        note=str(content.get("note") or ""),
    )


def _has(config: Mapping[str, Any], key: str, value: Any) -> bool:
    flat = flatten(dict(config))
    if key in flat:
        return flat[key] == value
    return is_target_default(dict(config), key, value)  # an argument added since, at its default


def headline_rows(report: Report, spec: HeadlineSpec) -> list[Row]:
    """The rows all of whose runs have every `where` value, fitted priors left out."""
    return [
        row
        for row in report.rows
        if row.runs
        and all(r.fit is None for r in row.runs)
        and all(_has(r.config, k, v) for r in row.runs for k, v in spec.where.items())
    ]


def headline_names(rows: Sequence[Row], spec: HeadlineSpec) -> list[str]:
    """Each headline row's name: the spec's name for its prior (else the option name), and what
    sets it apart from the other rows in parentheses, if anything does."""
    variants = _variants([r.runs[0].settings for r in rows], [r.prior for r in rows]) if rows else []
    return [
        spec.names.get(row.prior, row.prior) + (f" ({variant})" if variant else "")
        for row, variant in zip(rows, variants, strict=True)
    ]


def render_headline(report: Report, spec: HeadlineSpec, command: str) -> str:
    """`headline.md`: prior, seeds, test log p(x) mean ± sd over seeds, the published figure."""
    rows = headline_rows(report, spec)
    lines = [
        f"<!-- generated by `{command}`; edit the runs or the spec, not this file -->",
        "",
        "| prior | seeds | test log p(x), mean ± sd over seeds | published |",
        "|---|---|---|---|",
    ]
    for row, name in zip(rows, headline_names(rows, spec), strict=True):
        published = spec.published.get(row.prior)
        shown = "—" if published is None else _pm(published[0], published[1], 2)
        s = row.stats["log_likelihood"]
        lines.append(f"| {name} | {s.n} | {format_stat(s)} | {shown} |")
    lines += [
        "",
        f"Test log p(x) in nats{_evaluation(rows)}. ± is the standard deviation over seeds (independent "
        "training runs), as the published ± is; a row with one seed has none.",
    ]
    lines += [x for text in (spec.source, spec.note) if text for x in ("", text)]
    return "\n".join(lines) + "\n"


def _evaluation(rows: Sequence[Row]) -> str:
    """How the rows' test log p(x) was estimated, when every run agrees: ` (K = 5000, 10,000 test points)`."""
    runs = [r.surgery or {} for row in rows for r in row.runs]
    ks = {s.get("is_samples") for s in runs}
    points = {s.get("is_points") for s in runs}
    if len(ks) != 1 or len(points) != 1 or None in ks | points:
        return ""
    return f" (importance sampling, K = {ks.pop()}, on {points.pop():,} test points)"


# ---- rendering -----------------------------------------------------------------------


def _pm(mean: float, spread: float | None, digits: int, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{mean:{sign}.{digits}f}" + ("" if spread is None else f" ± {spread:.{digits}f}")


def format_stat(s: Stat, digits: int = 2) -> str:
    if s.mean is None:
        return "—"
    return _pm(s.mean, s.std, digits)


def _format_epochs(epochs: Sequence[int | None]) -> str:
    known = [e for e in epochs if e is not None]
    if not known:
        return "—"  # no metrics.jsonl: a fitted prior's or an evaluated checkpoint's directory
    lo, hi = min(known), max(known)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _format_seeds(seeds: Sequence[int | None]) -> str:
    return ", ".join("?" if s is None else str(s) for s in seeds)


def _cell(value: Any, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _render_pairs(pairs: Sequence[PairedDifference], same_setting: bool) -> list[str]:
    lines = []
    header = (
        "| row − baseline | seeds paired | per seed: difference ± s.e. over points | mean ± sd over seeds | points "
    )
    header += "| unpaired |"
    if same_setting:
        setting = None
        for p in pairs:
            if p.setting != setting:
                setting = p.setting
                lines += ["", f"**{setting}**", "", header, "|---|---|---|---|---|---|"]
            lines.append(_pair_line(p, f"{p.row} − {p.baseline}"))
    else:
        lines += ["", header, "|---|---|---|---|---|---|"]
        lines += [_pair_line(p, f"{p.row} − {p.baseline}") for p in pairs]
    return lines


def _pair_line(p: PairedDifference, name: str) -> str:
    per_seed = "; ".join(f"seed {s.seed}: {_pm(s.mean, s.stderr, 3, signed=True)}" for s in p.seeds)
    over = _pm(p.over_seeds.mean or 0.0, p.over_seeds.std, 3, signed=True)
    if p.over_seeds.std is None:
        over += " (one seed)"
    points = ", ".join(f"{n:,}" for n in sorted({s.n_points for s in p.seeds}))
    return f"| {name} | {len(p.seeds)} | {per_seed} | {over} | {points} | {'; '.join(p.unpaired) or '—'} |"


def render_markdown(report: Report, plots: Sequence[Path] = ()) -> str:
    lines = [
        "# ELBO surgery report",
        "",
        "In nats per data point. Each row is one prior in one setting; each cell is the mean ± sample standard "
        "deviation (ddof=1) over the row's runs (seeds), whose number `runs` gives; a single run shows its value, "
        "and **Per seed** below lists every run's own. ELBO, reconstruction, average KL, MI, marginal KL, TC, "
        "dimension-wise KL and optimal-prior ELBO are on the surgery split (`split`); test log p(x) is the "
        "importance-sampled log-likelihood of the test points. — : not reported (e.g. the dimension-wise KL "
        "of a non-factorized prior).",
        "",
    ]
    header = ["prior", "latents", "variant", *(title for _, title in COLUMNS), "runs", "seeds", "epochs", "split"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in report.rows:
        cells = [
            row.prior,
            str(row.latent_dim),
            row.variant or "—",
            *(format_stat(row.stats[k]) for k, _ in COLUMNS),
            str(row.n_runs),
            _format_seeds(row.seeds),
            _format_epochs(row.epochs),
            ",".join(row.splits),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if not report.rows:
        lines.append("")
        lines.append("No complete runs.")
    lines += ["", f"Complete runs: {sum(r.n_runs for r in report.rows)}; incomplete: {len(report.incomplete)}.", ""]
    mixed = [row for row in report.rows if made_by_different_code(row)]
    if mixed:
        lines += [
            "Made by different code (the sources their `code.jsonl` records differ; **Per seed** shows each "
            "run's): " + "; ".join(row_label(row) for row in mixed) + ".",
            "",
        ]
    if report.rows:
        lines += [
            "## Per seed",
            "",
            "Every complete run's own values, by row. The s.e. of test log p(x) is its standard error over the "
            "test points (mostly how hard each point is), not a spread over seeds. `code` is the commit and "
            "sources digest each process that trained the run recorded (`code.jsonl`, oldest first; — : made "
            "before runs recorded it).",
            "",
        ]
        header = ["prior", "latents", "variant", "seed", "epochs", *(title for _, title in COLUMNS)]
        header += ["s.e. (points)", "code", "run dir"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for row in report.rows:
            for run in row.runs:
                s = run.surgery or {}
                cells = [row.prior, str(row.latent_dim), row.variant or "—", _format_seeds([run.seed])]
                cells += ["—" if run.epochs is None else str(run.epochs)]
                cells += [_cell(s.get(k)) for k, _ in COLUMNS]
                cells += [_cell(s.get("log_likelihood_stderr")), " → ".join(run.code) or "—", str(run.path)]
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    fitted = [r for r in report.runs if r.problem is None and r.fit is not None]
    if fitted:
        lines += [
            "## Fitted after training",
            "",
            "Priors fitted to a trained model's frozen encoder and decoder (`python -m priors.fit`). With the "
            "networks fixed, the ELBO changes by exactly the marginal-KL reduction; the identity-gap column checks "
            "that (gain − reduction, ± its standard error). A row that names a refitted network moved it too: its "
            "gain also holds the reconstruction and mutual-information changes, and the gap is gain − "
            "(reconstruction change − MI change + reduction), its fit.json's `accounting`. The training split "
            "is where the prior was fitted, so its share is optimistic; the test split and test log p(x) are "
            "the honest measures. The exact aggregate "
            "posterior is the ceiling: it closes 100% of the training split's marginal KL.",
            "",
            "| fitted prior | to a model with | marginal KL, train (before → after) | closed, train | "
            "marginal KL, test (before → after) | closed, test | ELBO gain, train | identity gap | "
            "test log p(x) change | fit epochs, seconds |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in fitted:
            f, tr, te = r.fit, r.fit["train"], r.fit["test"]
            ll = f.get("test_log_likelihood_gain")
            how = "—" if not f.get("fit") else f"{f['fit']['epochs']}, {f['fit']['seconds']:.0f}"
            refitted = [n for n in NETWORKS if n not in f.get("frozen", NETWORKS)]
            how_fitted = (f" ({' and '.join(refitted)} refitted)" if refitted else "") + (
                " (fresh binarizations)" if (f.get("fit_options") or {}).get("rebinarize") else ""
            )
            flags = [
                *(["worse than the prior it replaced"] if (f.get("validation") or {}).get("worse") else []),
                *(["impossible figures"] if f.get("impossible") else []),
            ]
            lines.append(
                f"| {f['new_prior']}{how_fitted}{''.join(f' ({flag})' for flag in flags)} | {f['old_prior']} | "
                f"{tr['marginal_kl_before']:.3f} → {tr['marginal_kl_after']:.3f} | {_share(tr)} | "
                f"{te['marginal_kl_before']:.3f} → {te['marginal_kl_after']:.3f} | {_share(te)} | "
                f"{_signed(tr.get('elbo_gain'))} | "
                f"{_signed(tr.get('identity_gap'))} ± {tr['identity_gap_stderr']:.3f} | "
                f"{_signed(ll)}{_paired_stderr(f)} | {how} |"
            )
        lines.append("")
    if report.paired:
        same = [p for p in report.paired if p.same_setting]
        other = [p for p in report.paired if not p.same_setting]
        lines += [
            "## Paired differences in test log p(x)",
            "",
            "Row minus baseline on the same test points, seed by seed: seed s of one with seed s of the other "
            "(independent training runs either way; the seed number only fixes the pairing). Per seed, the mean "
            "of the per-point differences ± its standard error over the points: how hard each point is cancels, "
            "so it is far smaller than either row's own standard error. Over seeds, the mean ± sample standard "
            "deviation (ddof=1) of the per-seed differences: how much the difference moves from one training "
            "run to the next. A seed that only one row has, or whose run has no per-point log p(x), is left out "
            "of the pair and named under `unpaired`; its row's own mean above still counts it. Rows on other data "
            "settings are scored on other points and are not paired.",
        ]
        if same:
            lines += ["", "### Priors in one setting"]
            lines += _render_pairs(same, same_setting=True)
        if other:
            lines += ["", "### Other pairs on the same test points"]
            lines += _render_pairs(other, same_setting=False)
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


def _figure(width: float, height: float) -> Any:
    return new_figure(width, height, layout="constrained")


def plot_average_kl_split(report: Report, path: Path) -> Path:
    """Average KL split into mutual information (bottom) and marginal KL (top), one bar per
    prior and latent size, error bars over seeds; reconstruction is off scale, so left out."""
    keys = _variant_keys(report.rows)
    fig = _figure(max(6.0, 0.6 * len(report.rows) + 2), 4.5 + 0.2 * len(keys))
    ax = fig.add_subplot()
    labels = [f"{r.prior}\nz={r.latent_dim}" + (f"\n{keys[r.variant]}" if r.variant else "") for r in report.rows]
    _key_caption(fig, keys)
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


def _variant_keys(rows: Sequence[Row]) -> dict[str, str]:
    """`{variant: "[1]"}`: a variant is too long for a tick or a title, so it gets a key whose text
    goes under the figure (`_key_caption`)."""
    return {v: f"[{i + 1}]" for i, v in enumerate(dict.fromkeys(r.variant for r in rows if r.variant))}


def _key_caption(fig, keys: Mapping[str, str]) -> None:
    if keys:
        fig.supxlabel("\n".join(f"{k} {v}" for v, k in keys.items()), fontsize=7, ha="left", x=0.02)


def plot_samples_side_by_side(report: Report, path: Path, columns: int = 4) -> Path | None:
    """One picture of samples per row of the table (its first run that has `samples.png`), in a grid,
    each titled by its prior, latent size and test log p(x); None when no run has one."""
    import matplotlib.image as mpimg

    panels = []
    for row in report.rows:
        run = next((r for r in row.runs if r.samples_png is not None), None)
        if run is not None:
            panels.append((row, run.samples_png))
    if not panels:
        return None
    keys = _variant_keys([row for row, _ in panels])
    cols = min(columns, len(panels))
    grid_rows = math.ceil(len(panels) / cols)
    fig = _figure(2.6 * cols, 2.9 * grid_rows + 0.15 * len(keys))
    for i, (row, png) in enumerate(panels):
        ax = fig.add_subplot(grid_rows, cols, i + 1)
        ax.imshow(mpimg.imread(png))
        log_px = row.stats["log_likelihood"]
        title = f"{row.prior}, z={row.latent_dim}" + (f" {keys[row.variant]}" if row.variant else "")
        if log_px.mean is not None:
            title += f"\nlog p(x) {format_stat(log_px)}"
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    _key_caption(fig, keys)
    fig.savefig(path, dpi=100)
    return path


def draw_headline(ax: Any, rows: Sequence[Row], spec: HeadlineSpec) -> None:
    """The test log p(x) of the headline's `rows` (`headline_rows`) on `ax`, a line per row in
    the table's order (top first): each seed a dot with its standard error over the test
    points, the mean over seeds ± sd as a bar, the published figure ± sd as a hollow diamond; each
    of the spec's `levels` a vertical line (dashed, dotted, dash-dotted in turn), named in the legend
    with its value."""
    import textwrap

    names = headline_names(rows, spec)
    spread = 0.22  # the seeds' dots fan out over this height around their row
    for i, row in enumerate(rows):
        y = len(rows) - 1 - i
        runs = [r for r in row.runs if (r.surgery or {}).get("log_likelihood") is not None]
        offsets = np.linspace(spread, -spread, len(runs)) if len(runs) > 1 else [0.0]  # the first seed on top
        ax.errorbar(
            [r.surgery["log_likelihood"] for r in runs],
            [y + o for o in offsets],
            xerr=[r.surgery.get("log_likelihood_stderr") or 0.0 for r in runs],
            fmt="o",
            color="tab:blue",
            markersize=4,
            elinewidth=0.8,
            capsize=2,
            label="a seed ± s.e. over the test points" if i == 0 else None,
        )
        s = row.stats["log_likelihood"]
        if s.mean is not None:
            ax.errorbar(
                [s.mean],
                [y],
                xerr=[s.std or 0.0],
                fmt="|",
                color="black",
                markersize=18,
                elinewidth=3,
                label="mean ± sd over seeds" if i == 0 else None,
            )
        published = spec.published.get(row.prior)
        if published is not None:
            ax.errorbar(
                [published[0]],
                [y + spread + 0.18],
                xerr=[published[1] or 0.0],
                fmt="D",
                mfc="none",
                color="tab:red",
                capsize=3,
                label="published ± sd" if not any(spec.published.get(r.prior) for r in rows[:i]) else None,
            )
    level_labels = []
    for i, (label, value) in enumerate(spec.levels.items()):
        level_labels.append(f"{label}: {value:.2f}")
        ax.axvline(value, color="dimgray", linestyle=("--", ":", "-.")[i % 3], linewidth=1, label=level_labels[-1])
    ax.set_yticks(range(len(rows)), [textwrap.fill(n, 26) for n in reversed(names)], fontsize=8)
    ax.set_ylim(-0.6, len(rows) - 0.2)
    ax.set_xlabel("test log p(x), nats (higher is better)")
    ax.set_title(f"Test log p(x){_evaluation(rows)}", fontsize=9)
    ax.grid(axis="x", linewidth=0.5, alpha=0.5)
    handles, labels = ax.get_legend_handles_labels()  # matplotlib puts the lines first: the levels last
    order = sorted(range(len(labels)), key=lambda k: labels[k] in level_labels)
    ax.legend(
        [handles[k] for k in order],
        [labels[k] for k in order],
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.14),
        ncol=2 if spec.levels else 3,  # a level's label is long
        frameon=False,
    )


def plot_headline(report: Report, spec: HeadlineSpec, path: Path) -> Path:
    """`headline.png`: `draw_headline`, the headline table as a picture."""
    rows = headline_rows(report, spec)
    fig = _figure(7.0, 1.5 + 0.75 * len(rows))
    draw_headline(fig.add_subplot(), rows, spec)
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


#: Line styles of a row's runs, in order: its seeds share a colour and differ in dash.
RUN_DASHES: tuple[str, ...] = ("-", "--", ":", "-.")


def curve_styles(runs: Sequence[RunRecord]) -> list[tuple[int, str]]:
    """(colour index, line style) of each run's curve: one colour per row (prior, latent size and
    settings, as the report's rows group runs), the row's runs told apart by dash, in order."""
    colour: dict[tuple, int] = {}
    seen: dict[tuple, int] = {}
    styles = []
    for run in runs:
        key = (run.prior, run.latent_dim, run.settings)
        colour.setdefault(key, len(colour))
        styles.append((colour[key], RUN_DASHES[seen.get(key, 0) % len(RUN_DASHES)]))
        seen[key] = seen.get(key, 0) + 1
    return styles


def plot_learning_curves(runs: Sequence[RunRecord], path: Path) -> Path | None:
    """Validation ELBO against epoch for every run with metrics, finished or still going; None if none.
    The seeds of one row share a colour (`curve_styles`)."""
    curves = [(r, learning_curve(r.path / "metrics.jsonl")) for r in runs]
    curves = [(r, c) for r, c in curves if c]
    if not curves:
        return None
    import matplotlib

    fig = _figure(10.0, 4.5)  # the legend takes the right third
    ax = fig.add_subplot()
    styles = curve_styles([r for r, _ in curves])
    # past ten rows twenty colours; past twenty the colours come round again
    colours = matplotlib.colormaps["tab10" if max(i for i, _ in styles) < 10 else "tab20"]
    for (run, curve), (colour, dash) in zip(curves, styles, strict=True):
        label = f"{run.prior}, z={run.latent_dim}, {run.path.name}" + ("" if run.problem is None else " (unfinished)")
        ax.plot(
            [e for e, _, _ in curve],
            [v for _, v, _ in curve],
            dash,
            color=colours(colour % colours.N),
            label=label,
            linewidth=1,
        )
    best = max(v for _, c in curves for _, v, _ in c)
    ax.set_ylim(best - 25, best + 2)  # the first epochs are far below: keep the converging part readable
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation ELBO (nats)")
    ax.set_title("Learning curves (a row's seeds share a colour)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves, not over them
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def write_report(
    report: Report, out: str | Path, headline: HeadlineSpec | None = None, command: str = ""
) -> ReportFiles:
    """Write `report.md` and the PNGs to `out` (created), and with a `headline` spec also
    `headline.md` (`render_headline`, naming `command` as what regenerates it) and
    `headline.png` (`plot_headline`); return their paths."""
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
    headline_path = None
    if headline is not None:
        headline_path = out / "headline.md"
        headline_path.write_text(render_headline(report, headline, command))
        plots.append(plot_headline(report, headline, out / "headline.png"))
    return ReportFiles(markdown=markdown, plots=plots, headline=headline_path)


def _share(split: dict[str, Any]) -> str:
    """A split's share of the marginal KL closed, or why there is none (a negative KL estimate)."""
    if split.get("estimator_failure"):
        return "estimator failure"
    share = split.get("share_closed")
    return "—" if share is None else f"{100 * share:.1f}%"


def _paired_stderr(fit: dict[str, Any]) -> str:
    """` ± s.e.` of a fit's test log p(x) gain (paired over the test points), where fit.json has it."""
    se = fit.get("test_log_likelihood_gain_stderr")
    return "" if se is None or fit.get("test_log_likelihood_gain") is None else f" ± {se:.3f}"


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.3f}"


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (`surgery.report: error: ...`, exit 2) instead of the usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"surgery.report: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineArgumentParser(
        prog="python -m surgery.report",
        description="Tables across seeds, paired differences and plots of the ELBO decomposition of trained runs.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run dirs, multirun dirs, or folders holding them")
    parser.add_argument("--out", default="report", help="output dir (default: report/)")
    parser.add_argument(
        "--headline",
        metavar="SPEC.yaml",
        help="also write headline.md: the rows the spec selects, with published figures (see HeadlineSpec)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not args.out.strip() or (out.exists() and not out.is_dir()):
        parser.error(f"--out must be a directory path, got {args.out!r}{' (a file)' if out.is_file() else ''}")
    try:
        spec = None if args.headline is None else load_headline_spec(args.headline)
        report = build_report(args.paths)
    except (FileNotFoundError, NotADirectoryError, ConfigError) as e:
        print(f"surgery.report: error: {e}", file=sys.stderr)
        return 2
    if not report.runs:
        print(
            f"surgery.report: error: no run dirs found under {', '.join(args.paths)} "
            "(a run dir holds .hydra/config.yaml or checkpoints/)",
            file=sys.stderr,
        )
        return 2
    command = ""
    if spec is not None:
        if not headline_rows(report, spec):
            where = " ".join(format_setting(k, v) for k, v in spec.where.items())
            print(f"surgery.report: error: --headline {args.headline}: no complete run has {where}", file=sys.stderr)
            return 2
        command = shlex.join(
            ["python", "-m", "surgery.report", *args.paths, "--out", args.out, "--headline", args.headline]
        )
    files = write_report(report, args.out, spec, command)
    n_complete = sum(r.n_runs for r in report.rows)
    print(f"{len(report.runs)} runs: {n_complete} complete, {len(report.incomplete)} incomplete")
    for r in report.incomplete:
        print(f"  incomplete: {r.path}: {r.problem}")
    print(f"table: {files.markdown}")
    if files.headline is not None:
        print(f"headline: {files.headline}")
    for p in files.plots:
        print(f"plot:  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
