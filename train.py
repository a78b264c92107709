"""Train a VAE with a pluggable prior: `python train.py [overrides]` (Hydra)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from surgery.run import run_surgery
from vae import build_model, resolve_device
from vae.trainer import evaluate, load_checkpoint

log = logging.getLogger(__name__)


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


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train per `cfg`, evaluate the best checkpoint on the test split, return the metrics.

    Args:
        cfg: the composed config (`conf/train.yaml`).
        run_dir: output directory; defaults to Hydra's run directory.
    """
    run_dir = Path(run_dir) if run_dir is not None else Path(HydraConfig.get().runtime.output_dir)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    config = OmegaConf.to_container(cfg, resolve=True)

    data = hydra.utils.instantiate(cfg.data)
    model = build_model(cfg, data)
    group = cfg.logger.get("group") or _sweep_group()
    labels = run_labels(cfg)
    name = cfg.logger.get("name") or "{prior_name}-z{latent_dim}-s{seed}".format(**labels)
    logger = hydra.utils.instantiate(
        cfg.logger, run_dir=run_dir, run_config={**config, **labels}, group=group, name=name, _recursive_=False
    )
    failed = True
    try:
        trainer = hydra.utils.instantiate(
            cfg.trainer, run_dir=run_dir, device=device, logger=logger, seed=cfg.seed
        )
        state = trainer.fit(model, data, run_config=config)
        model.load_state_dict(load_checkpoint(trainer.best_path, map_location=device)["model"])
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
        if cfg.get("surgery") is not None and cfg.surgery.enabled:
            # ELBO surgery of the best checkpoint: surgery.json and pictures in the run dir, numbers to the logger.
            report, _ = run_surgery(model, data, cfg.surgery, run_dir, logger=logger, device=device)
            metrics["surgery"] = report.to_dict()
            metrics["surgery_table"] = report.table()
        failed = False
    finally:
        # A joblib worker outlives a failed job, so wandb's exit hook never marks the run failed.
        logger.finish(exit_code=1 if failed else 0)
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
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
