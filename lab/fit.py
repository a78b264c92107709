"""Fit a prior to a trained VAE, with its encoder and decoder frozen, and measure exactly what it wins.

    python -m priors.fit checkpoint=PATH prior=mixture [allow=[mypkg.*]] [out_dir=DIR] [fit.train_encoder=true]
        [fit.train_decoder=true] [fit.warm_start=true] [resume=true]

The fit is the project's one training loop, `vae.trainer.Trainer`, on the same ELBO
objective, with the encoder and decoder frozen (`trainer.freeze`) and the optimizer over
the new prior's parameters only. With the networks fixed, the ELBO's gradient for the prior
is that of the mean log p(z) at z ~ q(z|x_n), and maximizing that is minimizing the
marginal KL KL(q(z) || p(z)) (they differ by the entropy of q(z), which the prior does not
touch). The reconstruction and the mutual information cannot change, so a new prior changes
the ELBO by exactly the change in the marginal KL:

    new ELBO = old ELBO + old marginal KL - new marginal KL

The trainer early-stops on the validation ELBO (with the networks frozen, the mean log p(z)
at its fixed validation draws, up to a constant) and restores the best state. The exact
aggregate posterior is the ceiling: it closes 100%.

`fit.train_encoder=true` refits the encoder too (only the decoder frozen), and
`fit.train_decoder=true` the decoder (both: the whole model is fine-tuned with the new
prior): then the reconstruction and the mutual information move as well, and what holds is
each surgery's own identity, ELBO = reconstruction - mutual information - marginal KL, so that

    ELBO gain = reconstruction change - mutual-information change + marginal-KL reduction

(fit.json's `accounting` says which identity its `identity_gap` checks).

A prior fitted to the training posteriors is judged optimistically on them (a
non-parametric one, which holds the training encodings, most of all), so the gain is also
measured on the test split's surgery and in the test log p(x).

Writes a new run directory (default `<run dir>/fitted/<prior>-<suffix>`; one that already
holds a run is refused): fit_request.json, the surgeries before the fit in before/, the
trainer's checkpoints (whose config names the new prior) and metrics.jsonl, surgery.json
(train split), surgery_test.json, log_px_test.npy, samples.png, reconstructions.png, and
fit.json with the before/after comparison, which `python -m surgery.report` shows as "fitted
after training" rows. Each part is written as it ends, so `resume=true` (with the same
`out_dir`) continues a stopped fit where it was: it reads back the finished surgeries,
continues the fit from last.pt and a log p(x) pass from its progress file. Options:
conf/fit.yaml; the options, the random streams, resuming, what is reported and what is
flagged: docs/fitting.md.

Random streams: the new prior's initialization, the trainer's batch order and validation
noise, the steps' draws, the fixed validation draws and the surgeries' noise each come from
`seed` through a salt of their own (`vae.data.derive_seed`), so no stream replays another:
a mixture's initial means are never the z at which the surgery evaluates it.

What is flagged rather than reported: a negative marginal-KL estimate (beyond its Monte
Carlo error) is an estimator failure, so no share closed or ELBO gain is derived from it; a
positive ELBO or log p(x) on data in [0, 1] is impossible (surgery/checks.py); both make the
CLI exit with code 2 after writing fit.json. A fitted prior whose mean validation log p(z) is
below the replaced prior's, on the same fixed draws, is worse than it: fit.json says so and
the CLI ends with a warning, exit code 0 (the fit and its figures are valid; the prior lost).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import secrets
import sys
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from lab.checkpoint import checkpoint_option, load_model, run_dir_of
from lab.cli import CONF_DIR, one_line_errors
from lab.manifest import sha256_of
from lab.pictures import save_run_pictures
from lab.run_dir import config_changes, record_code, show_setting, write_config
from lab.surgery import (
    FIT_JSON,
    SurgeryOptions,
    check_is_points,
    decompose_into,
    read_surgery,
    surgery_json_name,
    write_json_dict,
)
from priors.base import Prior
from priors.densities import reparameterize
from surgery.checks import ImpossibleResultError, beyond, impossible_figures, in_unit_interval
from surgery.decomposition import Estimate, SurgeryReport
from vae import build_prior, resolve_device, training_inputs
from vae.callbacks import TrainingSetEncodings, encode
from vae.checkpoint import CHECKPOINT_FORMAT, METRICS_FILE, RunDirError, run_files, save_checkpoint
from vae.data import derive_seed
from vae.model import NETWORKS
from vae.trainer import Trainer
from vae.validation import ConfigError, check_arguments, check_bool, check_int, check_number, check_targets

log = logging.getLogger(__name__)

# The salts of `derive_seed(seed, salt)`, one per random stream of a fit. Their values are fixed
# (changing one changes every fit's figures) and apart from vae.data's (7, 100, 200, 300, and the
# split indices 0-2).
FIT_INIT_SALT = 400  # the new prior's initialization (the global RNG while it is built)
FIT_DRAWS_SALT = 410  # the trainer's seed: its batch order and validation noise derive from it
FIT_PRIOR_RNG_SALT = 420  # the global RNG during the fit: each step's z ~ q(z|x_n), a prior's own draws
FIT_VALIDATION_SALT = 430  # the fixed validation draws: the old prior (or model) against the new
FIT_EVALUATION_SALT = 440  # the surgeries before and after the fit, with surgery.seed as a second salt

#: The fit as asked for, written into out_dir at its start: `resume=true` continues only the same fit.
FIT_REQUEST = "fit_request.json"
#: The folder of out_dir that holds the surgeries of the model before the fit (a resumed fit reads them back).
BEFORE_DIR = "before"
#: The `fit` options a resumed fit may change: how long and how verbosely it trains.
RESUMABLE_FIT_OPTIONS = ("max_epochs", "max_seconds", "patience", "progress")


def accounting(frozen: tuple[str, ...]) -> str:
    """What fit.json's `accounting` says for the networks a fit keeps `frozen`: the identity its
    `identity_gap` checks."""
    if set(frozen) == set(NETWORKS):
        return (
            "encoder and decoder frozen: the reconstruction and the mutual information do not change, so "
            "elbo_gain = marginal_kl_reduction; identity_gap is their difference"
        )
    refitted = " and ".join(n for n in NETWORKS if n not in frozen)
    state = f"{refitted} refitted, {frozen[0]} frozen" if frozen else f"{refitted} refitted"
    return (
        f"{state}: the reconstruction and the mutual information change too, so "
        "elbo_gain = reconstruction change - mutual_info change + marginal_kl_reduction (each surgery's "
        "ELBO = reconstruction - mutual information - marginal KL); identity_gap is the difference, and "
        "elbo_gain = marginal_kl_reduction no longer holds"
    )


@dataclass(frozen=True)
class FitStreams:
    """The seeds of a fit's random streams, each derived from the fit's `seed` with a salt of its own."""

    init: int
    draws: int
    prior_rng: int
    validation: int
    evaluation: int

    @classmethod
    def of(cls, seed: int, surgery_seed: int = 0) -> FitStreams:
        return cls(
            init=derive_seed(seed, FIT_INIT_SALT),
            draws=derive_seed(seed, FIT_DRAWS_SALT),
            prior_rng=derive_seed(seed, FIT_PRIOR_RNG_SALT),
            validation=derive_seed(seed, FIT_VALIDATION_SALT),
            evaluation=derive_seed(seed, FIT_EVALUATION_SALT, surgery_seed),
        )


@dataclass(frozen=True)
class FitOptions:
    """How the prior is fitted (the `fit` node of conf/fit.yaml): the trainer's options for the fit."""

    lr: float
    batch_size: int
    max_epochs: int
    patience: int
    progress: bool
    max_seconds: float | None = None
    rebinarize: bool = False
    train_encoder: bool = False
    train_decoder: bool = False
    warm_start: bool = False

    def __post_init__(self) -> None:
        check_number("fit.lr", self.lr, 0, strict=True)
        check_int("fit.batch_size", self.batch_size, 1)
        check_int("fit.max_epochs", self.max_epochs, 1)
        check_int("fit.patience", self.patience, 1)
        check_bool("fit.progress", self.progress)
        check_bool("fit.rebinarize", self.rebinarize)
        check_bool("fit.train_encoder", self.train_encoder)
        check_bool("fit.train_decoder", self.train_decoder)
        check_bool("fit.warm_start", self.warm_start)
        if self.max_seconds is not None:
            check_number("fit.max_seconds", self.max_seconds, 0, strict=True)

    @property
    def frozen(self) -> tuple[str, ...]:
        """The parts of the model the fit keeps fixed (`trainer.freeze`)."""
        trained = {"encoder": self.train_encoder, "decoder": self.train_decoder}
        return tuple(n for n in NETWORKS if not trained[n])

    @property
    def refits_networks(self) -> bool:
        """Whether a network is refitted with the prior (then the reconstruction and the MI move too)."""
        return self.train_encoder or self.train_decoder

    def trainer(
        self, run_dir: str | Path, device: torch.device | str, seed: int, callbacks: list[Any], resume: bool = False
    ) -> Trainer:
        """The trainer that fits: Adam at `lr`, no KL warm-up, the frozen parts fixed; with `resume`,
        it continues from `run_dir`'s last.pt where there is one."""
        return Trainer(
            optimizer=partial(torch.optim.Adam, lr=self.lr),
            batch_size=self.batch_size,
            max_epochs=self.max_epochs,
            patience=self.patience,
            max_seconds=self.max_seconds,
            progress=self.progress,
            run_dir=run_dir,
            device=device,
            seed=seed,
            freeze=self.frozen,
            callbacks=callbacks,
            resume=resume,
        )


@dataclass
class FitHistory:
    epochs: int  # validations (one per epoch, and one at a stop mid-epoch)
    best_epoch: int
    best_val_log_prior: float | None  # the fitted prior's mean log p(z) on the fixed validation draws (frozen encoder)
    best_val_elbo: float  # the trainer's validation ELBO at the best epoch
    steps: int
    seconds: float
    curve: list[dict[str, float]]


@torch.no_grad()
def _log_prior(prior: Prior, z: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([prior.log_prob(b).double() for b in z.split(batch_size)])


def _mean_log_prior(prior: Prior, z: torch.Tensor, batch_size: int) -> float:
    return float(_log_prior(prior, z, batch_size).mean())


Posteriors = tuple[torch.Tensor, torch.Tensor]


def validation_draws(val: Posteriors, seed: int) -> torch.Tensor:
    """One fixed z ~ q(z|x_n) per validation posterior, from the fit's validation stream of `seed`."""
    generator = torch.Generator(device=val[0].device).manual_seed(FitStreams.of(seed).validation)
    return reparameterize(*val, generator)


class FitCurve:
    """The fit's callback: with the encoder frozen, the prior's mean log p(z) on the fixed
    validation draws at every validation (`val_log_prior`, added to metrics.jsonl and so to
    fit.json's curve: `fit_curve`). A validation figure that is not finite stops the fit.

    Args:
        z_val: the fixed validation draws (`validation_draws`); None when the encoder is refitted
            (the draws of the old encoder's posteriors then measure nothing of the new model).
        batch_size: draws per prior call.
    """

    def __init__(self, z_val: torch.Tensor | None, batch_size: int) -> None:
        self.z_val = z_val
        self.batch_size = batch_size

    def on_validation_end(self, trainer: Trainer, model: Any, data: Any, state: Any, record: dict[str, Any]) -> None:
        if self.z_val is not None:
            was_training = model.prior.training
            model.prior.eval()
            record["val_log_prior"] = _mean_log_prior(model.prior, self.z_val, self.batch_size)
            model.prior.train(was_training)
        bad = [k for k in ("val_elbo", "val_log_prior") if k in record and not math.isfinite(record[k])]
        if bad:
            raise FloatingPointError(
                f"fitting {type(model.prior).__name__}: the validation {bad[0].removeprefix('val_')} became "
                f"{record[bad[0]]} at epoch {record['epoch']}"
            )


#: What fit.json's curve keeps of each metrics.jsonl line (`val_log_prior` with the encoder frozen).
CURVE_KEYS = ("epoch", "step", "train_elbo", "val_elbo", "val_log_prior")


def fit_curve(out_dir: Path) -> tuple[list[dict[str, float]], float]:
    """fit.json's curve, one entry per validation, from the trainer's metrics.jsonl in `out_dir`
    (so a resumed fit's curve holds the epochs of every process), and the seconds of those epochs."""
    lines = [json.loads(line) for line in (out_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    curve = [{k: line[k] for k in CURVE_KEYS if k in line} for line in lines]
    return curve, sum(float(line["seconds"]) for line in lines)


def fixed_binarization(data: Any) -> Any:
    """`data` whose every training epoch is the fixed binarization the surgery decomposes (a shallow copy)."""
    fixed = copy.copy(data)
    fixed.dynamic = False
    return fixed


def validation_comparison(old: Prior, new: Prior, z_val: torch.Tensor, batch_size: int) -> dict[str, Any]:
    """The new prior against the one it replaces on the same fixed validation draws (frozen encoder).

    The difference of the mean log p(z) is the reduction of the validation split's
    marginal KL (the entropy of q(z) cancels); its standard error is that of the paired
    per-draw differences. `worse` when the new prior is below the old beyond IMPOSSIBLE_Z
    of those standard errors.
    """
    old_lp, new_lp = _log_prior(old.eval(), z_val, batch_size), _log_prior(new.eval(), z_val, batch_size)
    return _paired_comparison("log_prior", old_lp, new_lp)


def _paired_comparison(measure: str, before: torch.Tensor, after: torch.Tensor) -> dict[str, Any]:
    """fit.json's `validation`: the means of `measure` per draw before and after, their paired
    difference ± its standard error, and `worse` beyond IMPOSSIBLE_Z of those errors below 0."""
    gain = Estimate.of(after - before)
    return {
        "measure": measure,
        f"{measure}_before": float(before.mean()),
        f"{measure}_after": float(after.mean()),
        "gain": gain.value,
        "gain_stderr": gain.stderr,
        "worse": beyond(gain.value, 0.0, gain.stderr, above=False),
    }


@torch.no_grad()
def _elbo_per_point(model: Any, x: torch.Tensor, batch_size: int, seed: int) -> torch.Tensor:
    """One-sample ELBO of every row of `x`, in eval mode, with the noise of `seed` (a forked RNG)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for batch in x.split(batch_size):
            terms = model.elbo_terms(batch.to(device))
            out.append((terms.reconstruction - terms.kl).double().cpu())
    model.train(was_training)
    return torch.cat(out)


def validation_elbo_comparison(old: Any, new: Any, x: torch.Tensor, batch_size: int, seed: int) -> dict[str, Any]:
    """The refitted model against the one it replaces (`fit.train_encoder`, `fit.train_decoder`): the
    validation ELBO of each, per point with the same noise, and their paired difference; `worse` as in
    `validation_comparison`."""
    return _paired_comparison(
        "elbo", _elbo_per_point(old, x, batch_size, seed), _elbo_per_point(new, x, batch_size, seed)
    )


def warm_start(prior: Any, old_prior: Any, old_node: Any, new_node: Any) -> None:
    """`fit.warm_start`: the new prior starts from the checkpoint's own prior, its parameters
    and buffers copied (a second stage, e.g. the encoder refitted after a frozen fit has
    converged). Refused, with both configs named, unless the two prior nodes are the same."""
    old = OmegaConf.to_container(old_node, resolve=True)
    new = OmegaConf.to_container(new_node, resolve=True)
    if old != new:
        raise ConfigError(
            f"fit.warm_start=true starts the new prior from the checkpoint's, so both must be the same prior with "
            f"the same options; the checkpoint's is {old}, the new one {new}"
        )
    prior.load_state_dict(old_prior.state_dict())


def _surgeries(
    model: Any, data: Any, options: SurgeryOptions, device: torch.device, out_dir: Path, reuse: bool = False
) -> dict[str, SurgeryReport]:
    """The decomposition on the training split (with log p(x)) and on the test split (without),
    each written into `out_dir` as it ends (`lab.surgery.decompose_into`: a stopped log p(x) pass
    continues there). With `reuse`, a split whose report `out_dir` holds is read back instead."""
    reports = {}
    for split, split_options in (
        ("train", options),
        ("test", dataclasses.replace(options, split="test", is_samples=None)),
    ):
        if reuse and (out_dir / surgery_json_name(split_options.split)).exists():
            log.info("%s split: read back from %s", split, out_dir)
            reports[split] = read_surgery(out_dir, split_options.split)
        else:
            reports[split], _ = decompose_into(model, data, split_options, out_dir, device)
    return reports


def fit_request(
    checkpoint: Path, prior_node: Any, options: FitOptions, seed: int, surgery: SurgeryOptions
) -> dict[str, Any]:
    """What makes a fit this fit (`FIT_REQUEST`): the checkpoint's content, the new prior, the fit's
    options but those a resume may change (`RESUMABLE_FIT_OPTIONS`), the seed and the surgery's options."""
    request = {
        "checkpoint_sha256": sha256_of(checkpoint),
        "prior": OmegaConf.to_container(prior_node, resolve=True),
        "fit": {k: v for k, v in asdict(options).items() if k not in RESUMABLE_FIT_OPTIONS},
        "seed": seed,
        "surgery": asdict(surgery),
    }
    return json.loads(json.dumps(request))  # as the file reads back: tuples are lists


def check_resumable(out_dir: Path, request: dict[str, Any]) -> None:
    """Refuse `resume=true` into an `out_dir` that holds another fit, or a run that is not a fit,
    naming what differs."""
    path = out_dir / FIT_REQUEST
    if not path.exists():
        found = run_files(out_dir)
        if found:
            raise RunDirError(
                f"resume=true: out_dir {out_dir} holds a run ({', '.join(found)}) but no {FIT_REQUEST}, so it is "
                "not a fit that can be continued; give the fit a new out_dir"
            )
        return  # nothing was written yet: the fit starts
    changed = [
        f"{k}: {show_setting(old)} -> {show_setting(new)}"
        for k, (old, new) in config_changes(json.loads(path.read_text()), request).items()
    ]
    if changed:
        raise RunDirError(
            f"resume=true: out_dir {out_dir} holds another fit ({'; '.join(changed)}); resume with the same "
            f"checkpoint file and settings (only fit.{', fit.'.join(RESUMABLE_FIT_OPTIONS)} may change), or give "
            "the fit a new out_dir"
        )


def estimator_failure(kl: Estimate) -> bool:
    """Whether a marginal-KL estimate is negative beyond its Monte Carlo error: impossible for a KL."""
    return beyond(kl.value, 0.0, kl.stderr, above=False)


def comparison(before: dict[str, SurgeryReport], after: dict[str, SurgeryReport]) -> dict[str, Any]:
    """What the new prior won, per split: marginal KL before and after, the share closed, and the
    ELBO change against its accounting (`ACCOUNTING`), exact up to Monte Carlo error.

    `identity_gap` is the ELBO gain minus (reconstruction change - mutual-information change +
    marginal-KL reduction). With the encoder and decoder frozen both surgeries draw the same z
    through the same networks, so the reconstruction and the mutual information are identical
    and it is the ELBO gain minus the marginal-KL reduction; either way it is exactly the change
    in each surgery's own check, avg KL - (MI + marginal KL), whose Monte Carlo error each
    surgery measures on its samples.

    A marginal-KL estimate below 0 beyond its Monte Carlo error (before or after) is an
    estimator failure: the split's `estimator_failure` says which, and its share closed,
    ELBO gain and marginal-KL reduction are null rather than derived from it.
    """
    out: dict[str, Any] = {}
    for split in ("train", "test"):
        b, a = before[split], after[split]
        failed = [
            f"marginal KL {when} {r.marginal_kl.value:+.4g} ± {r.marginal_kl.stderr:.2g} nats"
            for when, r in (("before", b), ("after", a))
            if estimator_failure(r.marginal_kl)
        ]
        reduction = b.marginal_kl.value - a.marginal_kl.value
        gain = a.elbo.value - b.elbo.value
        moved = (a.reconstruction.value - b.reconstruction.value) - (a.mutual_info.value - b.mutual_info.value)
        stderr = math.hypot(b.identity_gap.stderr, a.identity_gap.stderr)
        share = reduction / b.marginal_kl.value if b.marginal_kl.value > 0 else math.nan
        out[split] = {
            "marginal_kl_before": b.marginal_kl.value,
            "marginal_kl_before_stderr": b.marginal_kl.stderr,
            "marginal_kl_after": a.marginal_kl.value,
            "marginal_kl_after_stderr": a.marginal_kl.stderr,
            "share_closed": None if failed else share,
            "elbo_before": b.elbo.value,
            "elbo_after": a.elbo.value,
            "elbo_gain": None if failed else gain,
            "marginal_kl_reduction": None if failed else reduction,
            "identity_gap": gain - (moved + reduction),
            "identity_gap_stderr": stderr,
            "reconstruction_before": b.reconstruction.value,
            "reconstruction_after": a.reconstruction.value,
            "mutual_info_before": b.mutual_info.value,
            "mutual_info_after": a.mutual_info.value,
            "estimator_failure": (
                "; ".join(failed) + ": a KL is never negative, so the estimator failed (the prior is not "
                "normalized, or it holds the points it is evaluated at); no gain is derived from it"
            )
            if failed
            else None,
        }
    ll_before, ll_after = before["train"].log_likelihood, after["train"].log_likelihood
    if ll_before is not None and ll_after is not None:
        out["test_log_likelihood_before"] = ll_before.value
        out["test_log_likelihood_after"] = ll_after.value
        out["test_log_likelihood_gain"] = ll_after.value - ll_before.value
        per_before, per_after = before["train"].log_likelihood_per_point, after["train"].log_likelihood_per_point
        if per_before is not None and per_after is not None and per_before.numel() > 1:
            # Paired: the same test points before and after, so how hard each point is cancels.
            diff = (per_after.double() - per_before.double()).cpu()
            out["test_log_likelihood_gain_stderr"] = diff.std().item() / math.sqrt(diff.numel())
    return out


def impossible_results(before: dict[str, SurgeryReport], after: dict[str, SurgeryReport], data: Any) -> list[str]:
    """The fit's figures that no correct model gives (surgery/checks.py): a negative marginal KL, a
    positive ELBO or log p(x) on data in [0, 1]; each as a few words naming it."""
    figures, split_of = [], {}
    for when, reports in (("before", before), ("after", after)):
        for split, r in reports.items():
            rows = [
                (f"{split} ELBO {when}", r.elbo, "elbo", r.split),
                (f"{split} marginal KL {when}", r.marginal_kl, "kl", r.split),
            ]
            if r.log_likelihood is not None:
                rows.append(
                    (f"{r.log_likelihood_split} log p(x) {when}", r.log_likelihood, "log_px", r.log_likelihood_split)
                )
            for name, estimate, kind, data_split in rows:
                figures.append((name, estimate.value, estimate.stderr, kind))
                split_of[name] = data_split
    unit: dict[str, bool] = {}

    def unit_data(name: str) -> bool:
        split = split_of[name]
        if split not in unit:
            unit[split] = in_unit_interval(data.split(split))
        return unit[split]

    return impossible_figures(figures, unit_data)


def fit_main(cfg: DictConfig) -> tuple[Path, dict[str, Any]]:
    """Load, fit with the trainer, decompose before and after, save; return the new run dir and fit.json's content.

    fit.json's `impossible` lists figures no correct model gives (the CLI then exits with
    code 2), `validation.worse` says the fitted prior lost to the one it replaced (the CLI
    warns), and each split's `estimator_failure` a negative marginal-KL estimate.
    """
    checkpoint = checkpoint_option(cfg)
    check_bool("debug", cfg.get("debug", False))
    check_targets(OmegaConf.to_container(cfg.prior, resolve=False), "prior")
    surgery = SurgeryOptions.from_config(cfg.surgery)
    options = FitOptions(**check_arguments("fit", FitOptions, OmegaConf.to_container(cfg.fit, resolve=True)))
    check_int("seed", cfg.seed, 0)
    seed = int(cfg.seed)
    resume = check_bool("resume", cfg.get("resume", False))
    streams = FitStreams.of(seed, surgery.seed)
    # The surgeries' noise is the evaluation stream: never the stream that initialized the prior.
    surgery = dataclasses.replace(surgery, seed=streams.evaluation)
    device = resolve_device(cfg.device)
    name = str(cfg.prior._target_).rsplit(".", 1)[-1]
    # Where the outputs go is settled before any work: next to the checkpoint only in a run dir of priorlab's.
    out_dir = (
        Path(cfg.out_dir).expanduser()
        if cfg.get("out_dir")
        else run_dir_of(checkpoint, "out_dir") / "fitted" / f"{name}-{secrets.token_hex(3)}"
    )
    request = fit_request(checkpoint, cfg.prior, options, seed, surgery)
    if resume:
        if not cfg.get("out_dir"):
            raise ConfigError(
                "resume=true continues the fit in out_dir: give the folder the stopped fit wrote (out_dir=DIR)"
            )
        check_resumable(out_dir, request)
        if (out_dir / FIT_JSON).exists():
            log.info("%s holds the finished fit (%s): nothing to continue", out_dir, FIT_JSON)
            return out_dir, json.loads((out_dir / FIT_JSON).read_text())
    else:
        found = run_files(out_dir) + ([FIT_REQUEST] if (out_dir / FIT_REQUEST).exists() else [])
        if found:  # the trainer appends to metrics.jsonl: two fits in one directory would mix their histories
            raise RunDirError(
                f"out_dir {out_dir} already holds a run ({', '.join(found)}); give the fit a new out_dir, or "
                "resume=true to continue the fit it holds"
            )
    model, data, run_cfg = load_model(checkpoint, device, allow=cfg.get("allow"), data_path=cfg.get("data_path"))
    check_is_points(surgery, data)
    if options.rebinarize and not getattr(data, "dynamic", False):
        raise ConfigError("fit.rebinarize=true needs dynamically binarized data; this checkpoint's are binarized once")
    for part in options.frozen:
        for p in getattr(model, part).parameters():
            p.requires_grad_(False)

    torch.manual_seed(streams.init)
    prior = build_prior(cfg.prior, model.latent_dim, model.encoder, training_inputs(data)).to(device)
    if options.warm_start:
        warm_start(prior, model.prior, run_cfg.prior, cfg.prior)

    # Everything the fit writes goes into out_dir as it is made, so that resume=true loses no finished part.
    (out_dir / BEFORE_DIR).mkdir(parents=True, exist_ok=True)
    write_json_dict(request, out_dir / FIT_REQUEST)
    config = OmegaConf.to_container(run_cfg, resolve=True)
    config["prior"] = OmegaConf.to_container(cfg.prior, resolve=True)
    write_config(out_dir, config)
    record_code(out_dir, None if resume else 0)  # a resumed fit may continue in a surgery, not a step

    log.info("surgery before the fit: train and test splits")
    before = _surgeries(model, data, surgery, device, out_dir / BEFORE_DIR, reuse=resume)
    val_post = encode(model.encoder, data.split("val"), surgery.batch_size, device)
    z_val = validation_draws(val_post, seed)
    old_prior = model.prior
    old_model = copy.deepcopy(model).eval() if options.refits_networks else None
    model.prior = prior

    saved = out_dir / "checkpoints" / "best.pt"
    encodings = TrainingSetEncodings(surgery.batch_size)
    history = None
    if any(p.requires_grad for p in model.parameters()):
        callbacks = [encodings, FitCurve(None if options.train_encoder else z_val, 4 * options.batch_size)]
        trainer = options.trainer(out_dir, device, streams.draws, callbacks, resume=resume)
        what = "".join(f"the {n} and " for n in NETWORKS if n not in options.frozen)
        rest = f"with the {' and the '.join(options.frozen)} frozen" if options.frozen else "nothing frozen"
        log.info("fitting %s%s, %s", what, type(prior).__name__, rest)
        torch.manual_seed(streams.prior_rng)  # a resumed fit restores the stream from last.pt instead
        # The trainer writes the checkpoints as it goes: a crash in the surgery after loses no fitting.
        state = trainer.fit(model, data if options.rebinarize else fixed_binarization(data), run_config=config)
        trainer.load_best(model, state)
        curve, seconds = fit_curve(out_dir)
        history = FitHistory(
            epochs=len(curve),
            best_epoch=state.best_epoch,
            best_val_log_prior=None,
            best_val_elbo=state.best_val_elbo,
            steps=state.step,
            seconds=seconds,
            curve=curve,
        )
    else:  # a prior without parameters (the exact aggregate posterior): built and evaluated, nothing to fit
        encodings.refresh(model, data.split("train"), device)
        save_checkpoint(
            saved,
            {
                "format": CHECKPOINT_FORMAT,
                "model": model.state_dict(),
                "optimizer": None,
                "state": None,
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": None,
                "config": config,
            },
        )
    model.eval()
    if options.refits_networks:
        validation = validation_elbo_comparison(
            old_model, model, data.split("val"), surgery.batch_size, streams.validation
        )
    else:
        validation = validation_comparison(old_prior, prior, z_val, 4 * options.batch_size)
        if history is not None:
            history.best_val_log_prior = validation["log_prior_after"]
    if history is not None:
        log.info(
            "fitted: best validation ELBO %.3f at epoch %d of %d, %.0f s",
            history.best_val_elbo,
            history.best_epoch,
            history.epochs,
            history.seconds,
        )

    log.info("saved %s; surgery after the fit: train and test splits", saved)
    after = _surgeries(model, data, surgery, device, out_dir)
    save_run_pictures(model, data, out_dir, seed=seed)
    result = {
        "fitted_from": str(cfg.checkpoint),  # as given: no machine path in committed results
        "old_prior": type(old_prior).__name__,
        "new_prior": type(prior).__name__,
        "accounting": accounting(options.frozen),
        **comparison(before, after),
        "validation": validation,
        "impossible": impossible_results(before, after, data),
        "fit": None if history is None else {k: v for k, v in asdict(history).items() if k != "curve"},
        "fit_options": asdict(options),
        "frozen": list(options.frozen),
        "seed": seed,
        "streams": asdict(streams),
        "curve": None if history is None else history.curve,
    }
    write_json_dict(result, out_dir / FIT_JSON)
    return out_dir, result


def summary(out_dir: Path, result: dict[str, Any]) -> tuple[list[str], list[str]]:
    """What the CLI prints: the result lines (stdout), then the closing warnings (stderr)."""
    refitted = set(result.get("frozen", NETWORKS)) != set(NETWORKS)
    lines = []
    for split in ("train", "test"):
        r = result[split]
        kl = f"marginal KL {r['marginal_kl_before']:.3f} -> {r['marginal_kl_after']:.3f} nats"
        elbo = f"ELBO {r['elbo_before']:.3f} -> {r['elbo_after']:.3f}"
        if r.get("estimator_failure"):
            lines.append(f"{split}: {kl}; {elbo}: ESTIMATOR FAILURE, no gain reported: {r['estimator_failure']}")
            continue
        if refitted:
            accounting = (
                f"reconstruction {r['reconstruction_after'] - r['reconstruction_before']:+.3f}, "
                f"mutual information {r['mutual_info_after'] - r['mutual_info_before']:+.3f}, "
                f"marginal-KL reduction {r['marginal_kl_reduction']:+.3f}"
            )
        else:
            accounting = f"marginal-KL reduction {r['marginal_kl_reduction']:+.3f}"
        lines.append(
            f"{split}: {kl} ({100 * r['share_closed']:.1f}% closed); {elbo} "
            f"(gain {r['elbo_gain']:+.3f}, {accounting}, "
            f"difference {r['identity_gap']:+.3f} +- {r['identity_gap_stderr']:.3f})"
        )
    if "test_log_likelihood_gain" in result:
        lines.append(
            f"test log p(x): {result['test_log_likelihood_before']:.3f} -> {result['test_log_likelihood_after']:.3f} "
            f"({result['test_log_likelihood_gain']:+.3f}"
            + (
                f" +- {result['test_log_likelihood_gain_stderr']:.3f} paired"
                if "test_log_likelihood_gain_stderr" in result
                else ""
            )
            + ")"
        )
    v = result["validation"]
    if v.get("measure") == "elbo":
        lines.append(
            f"validation ELBO, same noise: {v['elbo_before']:.3f} (the old networks and {result['old_prior']}) -> "
            f"{v['elbo_after']:.3f} (the refitted ones and {result['new_prior']}), "
            f"{v['gain']:+.3f} +- {v['gain_stderr']:.3f}"
        )
    else:
        lines.append(
            f"validation log p(z), same draws: {v['log_prior_before']:.3f} ({result['old_prior']}) -> "
            f"{v['log_prior_after']:.3f} ({result['new_prior']}), {v['gain']:+.3f} +- {v['gain_stderr']:.3f}"
        )
    lines.append(f"wrote {out_dir}")
    warnings = []
    if v["worse"] and v.get("measure") == "elbo":
        warnings.append(
            f"the refitted model is worse than the one it replaced: its mean validation ELBO is "
            f"{-v['gain']:.3f} +- {v['gain_stderr']:.3f} nats below the old networks and {result['old_prior']}'s "
            f"with the same noise; keep the old model"
        )
    elif v["worse"]:
        warnings.append(
            f"the fitted prior is worse than the one it replaced: its mean validation log p(z) is "
            f"{-v['gain']:.3f} +- {v['gain_stderr']:.3f} nats below {result['old_prior']}'s on the same draws "
            f"(the validation split's marginal KL grew by that much); keep the old prior"
        )
    return lines, warnings


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="fit")
def main(cfg: DictConfig) -> None:
    debug = cfg.get("debug") is True  # `debug=maybe` is refused inside, as a one-line error
    with one_line_errors("priors.fit", debug=debug):
        out_dir, result = fit_main(cfg)
    lines, warnings = summary(out_dir, result)
    print("\n".join(lines))
    for warning in warnings:
        print(f"priors.fit: warning: {warning}", file=sys.stderr)
    if result["impossible"]:
        with one_line_errors("priors.fit", debug=debug):
            raise ImpossibleResultError(
                f"the fit's figures are impossible, so a prior is wrong ({out_dir / FIT_JSON} flags them; they are "
                f"not results): {'; '.join(result['impossible'])}. Most likely the prior's log_prob is not "
                "normalized: check it with `python -m pytest tests/priors/test_prior_contract.py --prior MODULE.CLASS`"
            )


if __name__ == "__main__":
    main()
