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
`python -m surgery.report` shows as "fitted after training" rows. Options: conf/fit.yaml.
"""

from __future__ import annotations

import copy
import logging
import math
import secrets
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
from surgery.decomposition import SurgeryReport, decompose
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
from vae.checkpoint import load_model, run_dir_of
from vae.cli import one_line_errors
from vae.run_dir import write_config
from vae.trainer import CHECKPOINT_FORMAT, save_checkpoint
from vae.validation import ConfigError, check_bool, check_int, check_number

log = logging.getLogger(__name__)


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
def _mean_log_prior(prior: Prior, z: torch.Tensor, batch_size: int) -> float:
    return float(torch.cat([prior.log_prob(b).double() for b in z.split(batch_size)]).mean())


Posteriors = tuple[torch.Tensor, torch.Tensor]


def fit_prior(
    prior: Prior,
    train: Posteriors | Callable[[int], Posteriors],
    val: Posteriors,
    options: FitOptions,
    seed: int = 0,
) -> FitHistory:
    """Maximize the mean log p(z), z ~ q(z|x_n) drawn afresh each step from the training posteriors.

    Early stopping on the mean log p(z) at one fixed draw per validation posterior; the
    best state is restored into `prior` at the end. The posteriors are fixed tensors, so
    nothing but the prior's own parameters can move.

    Args:
        prior: the prior to fit, in place.
        train, val: (mu, logvar) of the training and validation posteriors, each `[N, D]`;
            `train` may instead be a function of the epoch (1, 2, ...) that returns them, for
            posteriors that change from epoch to epoch (`fit.rebinarize`).
        options: learning rate, batch size, epochs, patience, progress bar.
        seed: seeds the batch order and the draws.
    """
    params = [p for p in prior.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"{type(prior).__name__} has no parameters to fit")
    torch.manual_seed(seed)
    z_val = reparameterize(*val, torch.Generator(device=val[0].device).manual_seed(seed + 1))
    optimizer = torch.optim.Adam(params, lr=options.lr)
    best = -math.inf
    best_state = copy.deepcopy(prior.state_dict())
    best_epoch, bad, curve = 0, 0, []
    started = time.perf_counter()
    bar = tqdm(range(1, options.max_epochs + 1), desc=f"fitting {type(prior).__name__}", disable=not options.progress)
    for epoch in bar:
        prior.train()
        mu, logvar = train(epoch) if callable(train) else train
        order = torch.randperm(len(mu), device=mu.device)
        total = 0.0
        for index in order.split(options.batch_size):
            z = reparameterize(mu[index], logvar[index])
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


def _surgeries(model: Any, data: Any, options: SurgeryOptions, device: torch.device) -> dict[str, SurgeryReport]:
    """The decomposition on the training split (with log p(x)) and on the test split (without)."""
    train = decompose(model, data, device=device, **options.decompose_kwargs())
    test_kwargs = {**options.decompose_kwargs(), "split": "test", "is_samples": None}
    return {"train": train, "test": decompose(model, data, device=device, **test_kwargs)}


def comparison(before: dict[str, SurgeryReport], after: dict[str, SurgeryReport]) -> dict[str, Any]:
    """What the new prior won, per split: marginal KL before and after, the share closed, and the
    ELBO change against the marginal-KL reduction (equal up to Monte Carlo error)."""
    out: dict[str, Any] = {}
    for split in ("train", "test"):
        b, a = before[split], after[split]
        reduction = b.marginal_kl.value - a.marginal_kl.value
        gain = a.elbo.value - b.elbo.value
        # Same seed, same frozen networks: both surgeries draw the same z, so the reconstruction
        # and the mutual information are identical and gain - reduction is exactly the change in
        # each surgery's own check, avg KL - (MI + marginal KL), whose Monte Carlo error each
        # surgery measures on its samples.
        stderr = math.hypot(b.identity_gap.stderr, a.identity_gap.stderr)
        out[split] = {
            "marginal_kl_before": b.marginal_kl.value,
            "marginal_kl_after": a.marginal_kl.value,
            "share_closed": reduction / b.marginal_kl.value if b.marginal_kl.value > 0 else math.nan,
            "elbo_before": b.elbo.value,
            "elbo_after": a.elbo.value,
            "elbo_gain": gain,
            "marginal_kl_reduction": reduction,
            "identity_gap": gain - reduction,
            "identity_gap_stderr": stderr,
            "mutual_info_before": b.mutual_info.value,
            "mutual_info_after": a.mutual_info.value,
        }
    ll_before, ll_after = before["train"].log_likelihood, after["train"].log_likelihood
    if ll_before is not None and ll_after is not None:
        out["test_log_likelihood_before"] = ll_before.value
        out["test_log_likelihood_after"] = ll_after.value
        out["test_log_likelihood_gain"] = ll_after.value - ll_before.value
    return out


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
    """Load, fit, decompose before and after, save; return the new run dir and fit.json's content."""
    surgery = SurgeryOptions.from_config(cfg.surgery)
    options = FitOptions(**OmegaConf.to_container(cfg.fit, resolve=True))
    check_int("seed", cfg.seed, 0)
    device = resolve_device(cfg.device)
    checkpoint = Path(cfg.checkpoint).expanduser()
    model, data, run_cfg = load_model(checkpoint, device, allow=cfg.get("allow") or (), data_path=cfg.get("data_path"))
    check_is_points(surgery, data)
    if options.rebinarize and not getattr(data, "dynamic", False):
        raise ConfigError("fit.rebinarize=true needs dynamically binarized data; this checkpoint's are binarized once")
    torch.manual_seed(int(cfg.seed))  # the new prior's initialization, then the fit
    for p in list(model.encoder.parameters()) + list(model.decoder.parameters()):
        p.requires_grad_(False)

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
            seed=int(cfg.seed),
        )
        log.info(
            "fitted: best validation log p(z) %.3f at epoch %d of %d, %.0f s",
            history.best_val_log_prior,
            history.best_epoch,
            history.epochs,
            history.seconds,
        )
    old_prior = model.prior
    model.prior = prior

    name = str(cfg.prior._target_).rsplit(".", 1)[-1]
    out_dir = (
        Path(cfg.out_dir)
        if cfg.get("out_dir")
        else run_dir_of(checkpoint) / "fitted" / f"{name}-{secrets.token_hex(3)}"
    )
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
    save_run_pictures(model, data, out_dir, seed=int(cfg.seed))
    result = {
        "fitted_from": str(cfg.checkpoint),  # as given: no machine path in committed results
        "old_prior": type(old_prior).__name__,
        "new_prior": type(prior).__name__,
        **comparison(before, after),
        "fit": None if history is None else {k: v for k, v in asdict(history).items() if k != "curve"},
        "fit_options": asdict(options),
        "curve": None if history is None else history.curve,
    }
    write_json_dict(result, out_dir / FIT_JSON)
    return out_dir, result


@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parents[1] / "conf"), config_name="fit")
def main(cfg: DictConfig) -> None:
    with one_line_errors("priors.fit", debug=bool(cfg.get("debug"))):
        out_dir, result = fit_main(cfg)
    for split in ("train", "test"):
        r = result[split]
        print(
            f"{split}: marginal KL {r['marginal_kl_before']:.3f} -> {r['marginal_kl_after']:.3f} nats "
            f"({100 * r['share_closed']:.1f}% closed); ELBO {r['elbo_before']:.3f} -> {r['elbo_after']:.3f} "
            f"(gain {r['elbo_gain']:+.3f}, marginal-KL reduction {r['marginal_kl_reduction']:+.3f}, "
            f"difference {r['identity_gap']:+.3f} +- {r['identity_gap_stderr']:.3f})"
        )
    if "test_log_likelihood_gain" in result:
        print(
            f"test log p(x): {result['test_log_likelihood_before']:.3f} -> {result['test_log_likelihood_after']:.3f} "
            f"({result['test_log_likelihood_gain']:+.3f})"
        )
    print(f"wrote {out_dir}")
