"""Train a VAE with a pluggable prior: `python train.py [overrides]` (Hydra)."""

from __future__ import annotations

import contextlib
import logging
import secrets
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from lab.cli import one_line_errors
from lab.pictures import save_run_pictures
from lab.run_dir import (
    LOG_FILE,
    RunDirLock,
    check_fresh,
    log_to_file,
    made_by_hydra,
    record_code,
    record_resume,
    remove_empty_dirs,
    resume_changes,
    write_config,
    write_hydra_record,
)
from lab.surgery import SurgeryOptions, check_is_points, run_surgery
from surgery.checks import check_run_results
from surgery.text import format_table
from vae import build_model, instantiate, networks, resolve_device
from vae import data as data_options
from vae.checkpoint import load_checkpoint
from vae.trainer import evaluate
from vae.validation import (
    ConfigError,
    check_arguments,
    check_bool,
    check_choice,
    check_int,
    check_sizes,
    check_targets,
)

log = logging.getLogger(__name__)

#: The top-level keys of conf/train.yaml; anything else (`+foo=1`) is a typo priorlab would ignore.
TOP_LEVEL_KEYS = frozenset({"data", "vae", "prior", "trainer", "logger", "surgery", "seed", "device", "debug"})

# `${unique:}`: a short random suffix for default run directories, so two runs started in the
# same second never share one. Cached: every use in one config gets the same value.
OmegaConf.register_new_resolver("unique", lambda: secrets.token_hex(3), use_cache=True, replace=True)


def _sweep_group() -> str | None:
    """Runs of one `-m` sweep share the sweep directory as their wandb group."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return str(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None


def run_labels(cfg: DictConfig, choices: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keys runs are compared by, flat, for the wandb UI's group-by and filters.

    `prior_name` is the `prior` option picked (`runtime.choices`; `prior` itself is the
    prior's config node), else the prior's class name; `latent_dim` and `seed` as trained.
    """
    if choices is None and HydraConfig.initialized():
        choices = dict(HydraConfig.get().runtime.choices)
    name = (choices or {}).get("prior") or str(cfg.prior._target_).rsplit(".", 1)[-1]
    return {"prior_name": name, "latent_dim": int(cfg.vae.latent_dim), "seed": int(cfg.seed)}


#: The modes `vae.loggers.WandbLogger` takes (wandb's own error for another is a page of pydantic).
WANDB_MODES = ("offline", "online", "disabled")


def resolve_config(cfg: DictConfig) -> dict[str, Any]:
    """`cfg` resolved to plain containers; a value left `???` or an interpolation that does not
    resolve is a `ConfigError` naming its key."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} must be given ({e.full_key}=...): it has no default") from None
    except OmegaConfBaseException as e:
        message = " ".join(str(e).split("\n")[0].split())
        raise ConfigError(f"{e.full_key or 'the config'} cannot be resolved: {message}") from None


def check_prior(cfg: DictConfig, latent_dim: int) -> None:
    """Check the prior's options before any data are loaded.

    priorlab's own priors that need no model (`_partial_` ones need the encoder and the data)
    are built once, on a forked RNG, so their own checks run now; for any other prior the
    node's keys must be arguments its class takes.
    """
    node = cfg.prior
    target = str(node._target_)
    partial = bool(node.get("_partial_", False))
    given = ("latent_dim", "encoder", "train_x") if partial else ("latent_dim",)
    options = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if not str(k).startswith("_")}
    check_arguments("prior", get_object(target), options, given=given)
    if partial or not target.startswith("priors."):
        return
    try:
        with torch.random.fork_rng(devices=[]):
            instantiate(node, latent_dim=latent_dim)
    except InstantiationException as e:
        # The prior's own one-line error (a ValueError or ConfigError), not Hydra's wrapper around it.
        if isinstance(e.__cause__, (ValueError, TypeError)):
            raise e.__cause__ from None
        raise


def check_logger(node: dict[str, Any]) -> None:
    """The wandb logger's mode and keys (wandb itself would refuse them only after the run has its directory)."""
    if node.get("_target_") != "vae.loggers.WandbLogger":
        return
    from vae.loggers import WandbLogger

    options = {k: v for k, v in node.items() if not str(k).startswith("_")}
    check_arguments("logger", WandbLogger, options, given=("run_dir", "run_config"))
    check_choice("logger.mode", options.get("mode", "offline"), WANDB_MODES)


def check_config(cfg: DictConfig) -> tuple[dict[str, Any], SurgeryOptions | None]:
    """Every check that needs no data and writes nothing: unknown top-level keys, values left
    unset, `_target_`s, the seed, the model's sizes, the data's, the prior's, the logger's and
    the surgery's options. Returns the resolved config and the surgery options."""
    unknown = sorted(set(cfg.keys()) - TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(unknown)} (added with +KEY=...?): priorlab reads only "
            f"{', '.join(sorted(TOP_LEVEL_KEYS))}"
        )
    config = resolve_config(cfg)
    check_bool("debug", config.get("debug", False))
    check_int("seed", config["seed"], 0)
    check_targets(config)
    vae = config["vae"]
    latent_dim = check_int("vae.latent_dim", vae.get("latent_dim"), 1)
    if "hidden_dims" in vae:
        check_sizes("vae.hidden_dims", vae["hidden_dims"])
    for part in ("encoder", "decoder"):
        networks.check_options(f"vae.{part}", vae[part])
    data_options.check_options(config["data"])
    check_prior(cfg, latent_dim)
    check_logger(config["logger"])
    surgery = SurgeryOptions.from_config(cfg.surgery) if cfg.get("surgery") is not None else None
    return config, surgery


def _run_dir(run_dir: str | Path | None) -> Path:
    """The run directory: `run_dir`, or Hydra's; an empty one (the current directory) is refused."""
    if run_dir is not None:
        if not str(run_dir).strip():
            raise ConfigError("the run directory is empty; give one")
        return Path(run_dir)
    hc = HydraConfig.get()
    configured = hc.run.dir if hc.mode == RunMode.RUN else hc.sweep.dir
    option = "hydra.run.dir" if hc.mode == RunMode.RUN else "hydra.sweep.dir"
    if configured is None or not str(configured).strip():
        raise ConfigError(
            f"{option} is empty, which would write the run into the current directory; give the run a "
            f"directory of its own ({option}=outputs/NAME), or leave it unset for a fresh one"
        )
    return Path(hc.runtime.output_dir)


def save_run_config(run_dir: Path, cfg: DictConfig) -> None:
    """Write `.hydra/` (config, overrides, Hydra's own config), once the run may use the directory.

    Hydra's own writing is off (`hydra.output_subdir: null`): it would rewrite these files
    before a refused resume could stop it, and the report would then mislabel the run. Hydra's
    config leaves out the machine's paths (`lab.run_dir.write_hydra_record`).
    """
    write_config(run_dir, cfg)  # resolved: the report compares values
    out = run_dir / ".hydra"
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        write_hydra_record(run_dir, {"hydra": OmegaConf.to_container(hc)})
        OmegaConf.save(OmegaConf.create(list(hc.overrides.task)), out / "overrides.yaml")


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train per `cfg`, evaluate the best checkpoint on the test split, return the metrics.

    Every option is checked before any data is loaded or anything is written; the data and
    the model are built before the run claims its directory. A run refused before that leaves
    the directory as it was: the `.lock` it took and the directories it (or Hydra) made are
    removed. `train.log` is written from the claim on.

    Args:
        cfg: the composed config (`conf/train.yaml`).
        run_dir: output directory; defaults to Hydra's run directory.
    """
    run_dir = _run_dir(run_dir)
    # Hydra made the directory before this function ran; a refused run removes it again.
    made = made_by_hydra(run_dir) if HydraConfig.initialized() else []
    try:
        config, surgery = check_config(cfg)
        device = resolve_device(cfg.device)
        trainer = instantiate(cfg.trainer, run_dir=run_dir, device=device, seed=cfg.seed)
    except BaseException:
        remove_empty_dirs(made)
        raise

    with RunDirLock(run_dir, created=made) as lock, contextlib.ExitStack() as claimed:
        resume_from = trainer.resume_path
        changes = None
        if resume_from is not None:
            stored = load_checkpoint(resume_from)
            changes = resume_changes(stored["config"], config, resume_from)
        elif not trainer.resume:
            check_fresh(run_dir)
        torch.manual_seed(cfg.seed)
        # data.seed alone fixes the validation, test and surgery binarizations (shared by every run
        # seed); the per-epoch training draws follow the run's seed as well.
        data = instantiate(cfg.data).with_stream_seed(cfg.seed)
        if surgery is not None and surgery.enabled:
            check_is_points(surgery, data)
        model = build_model(cfg, data)

        # Every check passed: the run now writes into its directory, and keeps what it writes.
        lock.claim()
        claimed.enter_context(log_to_file(run_dir / LOG_FILE))
        save_run_config(run_dir, cfg)
        record_code(run_dir, 0 if changes is None else stored["state"]["step"])
        if changes is not None:
            record_resume(run_dir, stored["state"]["step"], changes)
        group = cfg.logger.get("group") or _sweep_group()
        labels = run_labels(cfg)
        name = cfg.logger.get("name") or "{prior_name}-z{latent_dim}-s{seed}".format(**labels)
        logger = hydra.utils.instantiate(
            cfg.logger, run_dir=run_dir, run_config={**config, **labels}, group=group, name=name, _recursive_=False
        )
        failed = True
        try:
            state = trainer.fit(model, data, run_config=config, logger=logger)
            trainer.load_best(model, state)
            test = evaluate(model, data.split("test"), trainer.eval_batch_size, seed=cfg.seed)
            metrics = {
                "val_elbo": state.best_val_elbo,
                "best_epoch": state.best_epoch,
                "epochs": state.epoch,
                "steps": state.step,
                "test_elbo": test.elbo,
                "test_reconstruction": test.reconstruction,
                "test_kl": test.kl,
                "run_dir": str(run_dir),
            }
            logger.summary({k: v for k, v in metrics.items() if k != "run_dir"})
            save_run_pictures(model, data, run_dir, logger=logger, seed=cfg.seed)
            if surgery is not None and surgery.enabled:
                # ELBO surgery of the best checkpoint: surgery.json and pictures in the run dir, numbers to the logger.
                report, _ = run_surgery(model, data, surgery, run_dir, logger=logger, device=device)
                metrics["surgery"] = report.to_dict()
                metrics["surgery_table"] = format_table(report)
            check_run_results(metrics, data)  # a positive ELBO or log p(x) on binary data fails the run, exit 2
            failed = False
        finally:
            # A joblib worker outlives a failed job, so wandb's exit hook never marks the run failed.
            logger.finish(exit_code=1 if failed else 0)
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    # Only a real `true` shows tracebacks: `debug=maybe` is refused by check_config, on one line.
    with one_line_errors("train.py", debug=cfg.get("debug") is True):
        metrics = train(cfg)
    print(
        f"run dir: {metrics['run_dir']}\n"
        f"best validation ELBO: {metrics['val_elbo']:.2f} nats (epoch {metrics['best_epoch']})\n"
        f"test ELBO (best checkpoint): {metrics['test_elbo']:.2f} nats"
    )
    if "surgery_table" in metrics:
        print(metrics["surgery_table"])
    return metrics["val_elbo"]  # the objective for sweepers


if __name__ == "__main__":
    main()
