"""Fit a prior to a trained VAE, with its encoder and decoder frozen, and measure exactly what it wins.

    python -m priors.fit checkpoint=PATH prior=mixture [allow=[mypkg.*]] [out_dir=DIR]

With the encoder and decoder fixed, the reconstruction and the mutual information cannot
change, so a new prior changes the ELBO by exactly the change in the marginal KL:

    new ELBO = old ELBO + old marginal KL - new marginal KL

Maximizing the average log p(z) over samples z ~ q(z|x_n) of the training set is the same
as minimizing the marginal KL KL(q(z) || p(z)) (they differ by the entropy of q(z), which
the prior does not touch). The fit early-stops on the same average over the validation
split's posteriors. The exact aggregate posterior is the ceiling: it closes 100%.

A prior fitted to the training posteriors is judged optimistically on them (a
non-parametric one, which holds the training encodings, most of all), so the gain is also
measured on the test split's surgery and in the test log p(x).

Writes a new run directory (default `<run dir>/fitted/<prior>-<suffix>`): a checkpoint whose
config names the new prior, surgery.json (train split), surgery_test.json, log_px_test.npy,
samples.png, reconstructions.png, and fit.json with the before/after comparison, which
`python -m surgery.report` shows as "fitted after training" rows. Options: conf/fit.yaml;
the options, the random streams, what is reported and what is flagged: docs/fitting.md.

Random streams: the new prior's initialization, the fit's batch order and draws, the
validation draws and the surgeries' noise each come from `seed` through a salt of their own
(`vae.data.derive_seed`), so no stream replays another: a mixture's initial means are never
the z at which the surgery evaluates it.

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
import logging
import math
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from priors.base import Prior
from priors.densities import reparameterize
from surgery.checks import ImpossibleResultError, beyond, impossible_figures, in_unit_interval
from surgery.decomposition import Estimate, SurgeryReport, decompose
from surgery.run import (
    FIT_JSON,
    SurgeryOptions,
    check_is_points,
    log_px_name,
    save_run_pictures,
    surgery_json_name,
    write_json,
    write_json_dict,
    write_log_px,
)
from vae import build_prior, resolve_device
from vae.callbacks import consumers, encode
from vae.checkpoint import checkpoint_option, load_model, run_dir_of
from vae.cli import one_line_errors
from vae.data import derive_seed
from vae.run_dir import write_config
from vae.trainer import CHECKPOINT_FORMAT, save_checkpoint
from vae.validation import ConfigError, check_arguments, check_bool, check_int, check_number, check_targets

log = logging.getLogger(__name__)

# The salts of `derive_seed(seed, salt)`, one per random stream of a fit. Their values are fixed
# (changing one changes every fit's figures) and apart from vae.data's (7, 100, 200, 300, and the
# split indices 0-2).
FIT_INIT_SALT = 400  # the new prior's initialization (the global RNG while it is built)
FIT_DRAWS_SALT = 410  # the fit's batch order and its z ~ q(z|x_n) (a generator of its own)
FIT_PRIOR_RNG_SALT = 420  # the global RNG during the fit, for a prior's own draws (a random exemplar subset)
FIT_VALIDATION_SALT = 430  # the fixed validation draws: early stopping, and the old prior against the new
FIT_EVALUATION_SALT = 440  # the surgeries before and after the fit, with surgery.seed as a second salt


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
    """How the prior is fitted (the `fit` node of conf/fit.yaml)."""

    lr: float
    batch_size: int
    max_epochs: int
    patience: int
    progress: bool
    max_seconds: float | None = None
    rebinarize: bool = False

    def __post_init__(self) -> None:
        check_number("fit.lr", self.lr, 0, strict=True)
        check_int("fit.batch_size", self.batch_size, 1)
        check_int("fit.max_epochs", self.max_epochs, 1)
        check_int("fit.patience", self.patience, 1)
        check_bool("fit.progress", self.progress)
        check_bool("fit.rebinarize", self.rebinarize)
        if self.max_seconds is not None:
            check_number("fit.max_seconds", self.max_seconds, 0, strict=True)


@dataclass
class FitHistory:
    epochs: int
    best_epoch: int
    best_val_log_prior: float  # mean log p(z) over the validation posteriors' fixed samples
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


def fit_prior(
    prior: Prior,
    train: Posteriors | Callable[[int], Posteriors],
    val: Posteriors,
    options: FitOptions,
    seed: int = 0,
) -> FitHistory:
    """Maximize the mean log p(z), z ~ q(z|x_n) drawn afresh each step from the training posteriors.

    Early stopping on the mean log p(z) at one fixed draw per validation posterior
    (`validation_draws`); the best state is restored into `prior` at the end. The
    posteriors are fixed tensors, so nothing but the prior's own parameters can move.

    Args:
        prior: the prior to fit, in place.
        train, val: (mu, logvar) of the training and validation posteriors, each `[N, D]`;
            `train` may instead be a function of the epoch (1, 2, ...) that returns them, for
            posteriors that change from epoch to epoch (`fit.rebinarize`).
        options: learning rate, batch size, epochs, patience, progress bar.
        seed: the fit's seed; the batch order and draws, the validation draws and the global
            RNG (a prior's own draws) each use a stream of their own derived from it (`FitStreams`).
    """
    params = [p for p in prior.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"{type(prior).__name__} has no parameters to fit")
    streams = FitStreams.of(seed)
    torch.manual_seed(streams.prior_rng)
    z_val = validation_draws(val, seed)
    optimizer = torch.optim.Adam(params, lr=options.lr)
    generators: dict[torch.device, torch.Generator] = {}
    best = -math.inf
    best_state = copy.deepcopy(prior.state_dict())
    best_epoch, bad, curve = 0, 0, []
    started = time.perf_counter()
    bar = tqdm(range(1, options.max_epochs + 1), desc=f"fitting {type(prior).__name__}", disable=not options.progress)
    for epoch in bar:
        prior.train()
        mu, logvar = train(epoch) if callable(train) else train
        if mu.device not in generators:
            generators[mu.device] = torch.Generator(device=mu.device).manual_seed(streams.draws)
        generator = generators[mu.device]
        order = torch.randperm(len(mu), device=mu.device, generator=generator)
        total = 0.0
        for index in order.split(options.batch_size):
            z = reparameterize(mu[index], logvar[index], generator)
            loss = -prior.log_prob(z, context=index).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        prior.eval()
        train_score = -total / len(mu)
        val_score = _mean_log_prior(prior, z_val, 4 * options.batch_size)
        curve.append({"epoch": epoch, "train_log_prior": train_score, "val_log_prior": val_score})
        bar.set_postfix(train=f"{train_score:.3f}", val=f"{val_score:.3f}")
        if not options.progress:  # a background job's log still shows where the fit stands
            log.info("fit epoch %d: train log p(z) %.3f, val log p(z) %.3f", epoch, train_score, val_score)
        if not math.isfinite(val_score):
            raise FloatingPointError(
                f"fitting {type(prior).__name__}: the validation log p(z) became {val_score} at epoch {epoch}"
            )
        if val_score > best:
            best, best_epoch, bad = val_score, epoch, 0
            best_state = copy.deepcopy(prior.state_dict())
        else:
            bad += 1
            if bad >= options.patience:
                break
        if options.max_seconds is not None and time.perf_counter() - started > options.max_seconds:
            break
    bar.close()
    prior.load_state_dict(best_state)
    prior.eval()
    return FitHistory(len(curve), best_epoch, best, time.perf_counter() - started, curve)


def validation_comparison(old: Prior, new: Prior, z_val: torch.Tensor, batch_size: int) -> dict[str, Any]:
    """The new prior against the one it replaces on the same fixed validation draws.

    The difference of the mean log p(z) is the reduction of the validation split's
    marginal KL (the entropy of q(z) cancels); its standard error is that of the paired
    per-draw differences. `worse` when the new prior is below the old beyond IMPOSSIBLE_Z
    of those standard errors.
    """
    old_lp, new_lp = _log_prior(old.eval(), z_val, batch_size), _log_prior(new.eval(), z_val, batch_size)
    gain = Estimate.of(new_lp - old_lp)
    return {
        "log_prior_before": float(old_lp.mean()),
        "log_prior_after": float(new_lp.mean()),
        "gain": gain.value,
        "gain_stderr": gain.stderr,
        "worse": beyond(gain.value, 0.0, gain.stderr, above=False),
    }


def _surgeries(model: Any, data: Any, options: SurgeryOptions, device: torch.device) -> dict[str, SurgeryReport]:
    """The decomposition on the training split (with log p(x)) and on the test split (without)."""
    train = decompose(model, data, device=device, **options.decompose_kwargs())
    test_kwargs = {**options.decompose_kwargs(), "split": "test", "is_samples": None}
    return {"train": train, "test": decompose(model, data, device=device, **test_kwargs)}


def estimator_failure(kl: Estimate) -> bool:
    """Whether a marginal-KL estimate is negative beyond its Monte Carlo error: impossible for a KL."""
    return beyond(kl.value, 0.0, kl.stderr, above=False)


def comparison(before: dict[str, SurgeryReport], after: dict[str, SurgeryReport]) -> dict[str, Any]:
    """What the new prior won, per split: marginal KL before and after, the share closed, and the
    ELBO change against the marginal-KL reduction (equal up to Monte Carlo error).

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
        # Both surgeries draw from the same evaluation stream through the same frozen networks, so
        # they draw the same z: the reconstruction and the mutual information are identical and
        # gain - reduction is exactly the change in each surgery's own check, avg KL - (MI +
        # marginal KL), whose Monte Carlo error each surgery measures on its samples.
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
            "identity_gap": gain - reduction,
            "identity_gap_stderr": stderr,
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


def _training_posteriors(
    model: Any, data: Any, fixed: Posteriors, options: FitOptions, batch_size: int, device: torch.device
) -> Posteriors | Callable[[int], Posteriors]:
    """What the prior is fitted to: the posteriors of the fixed binarization the surgery uses, or
    with `fit.rebinarize` those of epoch e's draw of the training images (the draws the model
    trained on, `data.train_epoch`), encoded afresh each epoch: more of the distribution the
    encoder saw, so less of one binarization's noise to overfit."""
    if not options.rebinarize:
        return fixed
    return lambda epoch: encode(model.encoder, data.train_epoch(epoch), batch_size, device)


def fit_main(cfg: DictConfig) -> tuple[Path, dict[str, Any]]:
    """Load, fit, decompose before and after, save; return the new run dir and fit.json's content.

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
    model, data, run_cfg = load_model(checkpoint, device, allow=cfg.get("allow"), data_path=cfg.get("data_path"))
    check_is_points(surgery, data)
    if options.rebinarize and not getattr(data, "dynamic", False):
        raise ConfigError("fit.rebinarize=true needs dynamically binarized data; this checkpoint's are binarized once")
    for p in list(model.encoder.parameters()) + list(model.decoder.parameters()):
        p.requires_grad_(False)

    torch.manual_seed(streams.init)
    prior = build_prior(cfg.prior, model.latent_dim, model.encoder, data.split("train")).to(device)

    log.info("surgery before the fit: train and test splits")
    before = _surgeries(model, data, surgery, device)
    train_post = encode(model.encoder, data.split("train"), surgery.batch_size, device)
    val_post = encode(model.encoder, data.split("val"), surgery.batch_size, device)
    for consumer in consumers(prior):
        consumer.update_encodings(*train_post)
    history = None
    if any(p.requires_grad for p in prior.parameters()):
        log.info("fitting %s to %d training posteriors", type(prior).__name__, len(train_post[0]))
        history = fit_prior(
            prior,
            _training_posteriors(model, data, train_post, options, surgery.batch_size, device),
            val_post,
            options,
            seed=seed,
        )
        log.info(
            "fitted: best validation log p(z) %.3f at epoch %d of %d, %.0f s",
            history.best_val_log_prior,
            history.best_epoch,
            history.epochs,
            history.seconds,
        )
    old_prior = model.prior
    validation = validation_comparison(old_prior, prior, validation_draws(val_post, seed), 4 * options.batch_size)
    model.prior = prior

    out_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(run_cfg, resolve=True)
    config["prior"] = OmegaConf.to_container(cfg.prior, resolve=True)
    # The fitted prior is saved before the surgery after the fit: a crash there loses no fitting.
    saved = out_dir / "checkpoints" / "best.pt"
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
    write_config(out_dir, config)
    log.info("saved %s; surgery after the fit: train and test splits", saved)
    after = _surgeries(model, data, surgery, device)
    for split, report in after.items():
        write_json(report, out_dir / surgery_json_name(split))
    if after["train"].log_likelihood_per_point is not None:
        write_log_px(
            after["train"].log_likelihood_per_point, out_dir / log_px_name(after["train"].log_likelihood_split)
        )
    save_run_pictures(model, data, out_dir, seed=seed)
    result = {
        "fitted_from": str(cfg.checkpoint),  # as given: no machine path in committed results
        "old_prior": type(old_prior).__name__,
        "new_prior": type(prior).__name__,
        **comparison(before, after),
        "validation": validation,
        "impossible": impossible_results(before, after, data),
        "fit": None if history is None else {k: v for k, v in asdict(history).items() if k != "curve"},
        "fit_options": asdict(options),
        "seed": seed,
        "streams": asdict(streams),
        "curve": None if history is None else history.curve,
    }
    write_json_dict(result, out_dir / FIT_JSON)
    return out_dir, result


def summary(out_dir: Path, result: dict[str, Any]) -> tuple[list[str], list[str]]:
    """What the CLI prints: the result lines (stdout), then the closing warnings (stderr)."""
    lines = []
    for split in ("train", "test"):
        r = result[split]
        kl = f"marginal KL {r['marginal_kl_before']:.3f} -> {r['marginal_kl_after']:.3f} nats"
        elbo = f"ELBO {r['elbo_before']:.3f} -> {r['elbo_after']:.3f}"
        if r.get("estimator_failure"):
            lines.append(f"{split}: {kl}; {elbo}: ESTIMATOR FAILURE, no gain reported: {r['estimator_failure']}")
            continue
        lines.append(
            f"{split}: {kl} ({100 * r['share_closed']:.1f}% closed); {elbo} "
            f"(gain {r['elbo_gain']:+.3f}, marginal-KL reduction {r['marginal_kl_reduction']:+.3f}, "
            f"difference {r['identity_gap']:+.3f} +- {r['identity_gap_stderr']:.3f})"
        )
    if "test_log_likelihood_gain" in result:
        lines.append(
            f"test log p(x): {result['test_log_likelihood_before']:.3f} -> {result['test_log_likelihood_after']:.3f} "
            f"({result['test_log_likelihood_gain']:+.3f})"
        )
    v = result["validation"]
    lines.append(
        f"validation log p(z), same draws: {v['log_prior_before']:.3f} ({result['old_prior']}) -> "
        f"{v['log_prior_after']:.3f} ({result['new_prior']}), {v['gain']:+.3f} +- {v['gain_stderr']:.3f}"
    )
    lines.append(f"wrote {out_dir}")
    warnings = []
    if v["worse"]:
        warnings.append(
            f"the fitted prior is worse than the one it replaced: its mean validation log p(z) is "
            f"{-v['gain']:.3f} +- {v['gain_stderr']:.3f} nats below {result['old_prior']}'s on the same draws "
            f"(the validation split's marginal KL grew by that much); keep the old prior"
        )
    return lines, warnings


@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parents[1] / "conf"), config_name="fit")
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
