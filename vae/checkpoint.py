"""Rebuild a trained model from a checkpoint, building only what the checkpoint may build."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vae import build_model, instantiate
from vae.data import DataError
from vae.trainer import load_checkpoint
from vae.trust import check_trusted

# The stored config's nodes that rebuild a model; nothing else in it is instantiated.
MODEL_NODES = ("data", "vae", "prior")


class CheckpointError(ValueError):
    """The checkpoint cannot rebuild a model."""


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run directory a checkpoint belongs to: `<run dir>/checkpoints/<name>.pt` -> `<run dir>`."""
    return Path(checkpoint).expanduser().resolve().parent.parent


def load_model(
    checkpoint: str | Path, device: Any = "cpu", allow: Iterable[str] = (), data_path: str | Path | None = None
) -> tuple[Any, Any, DictConfig]:
    """Rebuild (model, data, run config) from a priorlab checkpoint.

    `data_path` replaces the stored `data.path` (the data file where the checkpoint was
    made may not exist here); the data are otherwise rebuilt exactly as stored.

    The file is read with `torch.load(weights_only=True)` (via `vae.trainer.load_checkpoint`),
    so it is never unpickled, and its stored config is checked by `vae.trust.check_trusted`
    before anything is instantiated: only priorlab's own classes and dataset factories, nflows
    transforms and torch optimizers, plus the glob patterns in `allow` (`["mypkg.*"]`), may be
    built from it. An untrusted `_target_` raises `UntrustedTargetError` and nothing runs.
    """
    path = Path(checkpoint).expanduser()
    payload = load_checkpoint(path, map_location="cpu")
    config = payload.get("config")
    if not isinstance(config, dict) or not set(MODEL_NODES) <= set(config):
        raise CheckpointError(
            f"{path} holds no run config with data, vae and prior (was it written by priorlab's trainer?)"
        )
    check_trusted({key: config[key] for key in MODEL_NODES}, allow, source=str(path))
    run_cfg = OmegaConf.create(config)
    if data_path is not None:
        if "path" not in run_cfg.data:
            target = run_cfg.data.get("_target_")
            raise CheckpointError(f"{path}: its data ({target}) take no path, so data_path cannot apply")
        run_cfg.data.path = str(data_path)
    try:
        data = instantiate(run_cfg.data)
    except DataError as e:
        if data_path is not None:
            raise
        raise DataError(f"{e} (the data {path} was trained on); pass data_path=<your copy of that file>") from e
    model = build_model(run_cfg, data)
    try:
        model.load_state_dict(payload["model"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: the stored weights do not fit the model its config builds: {e}") from e
    return model.to(device), data, run_cfg
