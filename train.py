"""Train a VAE with a pluggable prior: `python train.py [overrides]` (Hydra)."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from surgery.run import SurgeryOptions, check_is_points, run_surgery, save_run_pictures
from surgery.text import format_table
from vae import build_model, instantiate, resolve_device
from vae.cli import one_line_errors
from vae.run_dir import RunDirLock, check_fresh, record_resume, resume_changes, write_config
from vae.trainer import evaluate, load_checkpoint
from vae.validation import ConfigError, check_int

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


def check_config(cfg: DictConfig) -> SurgeryOptions | None:
    """The checks that need no data: unknown top-level keys, the seed, the surgery options."""
    unknown = sorted(set(cfg.keys()) - TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(unknown)} (added with +KEY=...?): priorlab reads only "
            f"{', '.join(sorted(TOP_LEVEL_KEYS))}"
        )
    check_int("seed", cfg.seed, 0)
    check_int("vae.latent_dim", cfg.vae.latent_dim, 1)
    return SurgeryOptions.from_config(cfg.surgery) if cfg.get("surgery") is not None else None


def save_run_config(run_dir: Path, cfg: DictConfig) -> None:
    """Write `.hydra/` (config, overrides, Hydra's own config), once the run may use the directory.

    Hydra's own writing is off (`hydra.output_subdir: null`): it would rewrite these files
    before a refused resume could stop it, and the report would then mislabel the run.
    """
    write_config(run_dir, cfg)  # resolved: the report compares values
    out = run_dir / ".hydra"
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(hc)}), out / "hydra.yaml")
        OmegaConf.save(OmegaConf.create(list(hc.overrides.task)), out / "overrides.yaml")


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train per `cfg`, evaluate the best checkpoint on the test split, return the metrics.

    Every option is checked, and the run directory claimed, before any data is loaded or
    any file is written.

    Args:
        cfg: the composed config (`conf/train.yaml`).
        run_dir: output directory; defaults to Hydra's run directory.
    """
    surgery = check_config(cfg)
    run_dir = Path(run_dir) if run_dir is not None else Path(HydraConfig.get().runtime.output_dir)
    device = resolve_device(cfg.device)
    config = OmegaConf.to_container(cfg, resolve=True)
    trainer = instantiate(cfg.trainer, run_dir=run_dir, device=device, seed=cfg.seed)

    with RunDirLock(run_dir):
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

        save_run_config(run_dir, cfg)
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
            failed = False
        finally:
            # A joblib worker outlives a failed job, so wandb's exit hook never marks the run failed.
            logger.finish(exit_code=1 if failed else 0)
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    with one_line_errors("train.py", debug=bool(cfg.get("debug"))):
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
